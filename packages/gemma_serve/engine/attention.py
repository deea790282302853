"""Attention over the paged KV cache, for a flattened batch that mixes decodes and prefill chunks.

This is the portable reference path in plain PyTorch (any device), computed in float32:

- decodes (sequences with one new token, placed first in the batch) are attended together: each
  one's keys and values are gathered through its block table into a padded [batch, span] layout;
- prefill chunks are attended one sequence at a time, queries in tiles, so memory stays bounded by
  one tile's scores whatever mix of lengths the step holds (padding every sequence to the longest
  query would need batch x longest_query x context scores).

Sliding-window layers only gather the keys inside the window. Gemma 3's image tokens add one
exception to causality during prefill: the tokens of one image (a run listed in
`AttentionMetadata.image_spans_host`) also see the later tokens of that image, as transformers'
Gemma3 masks do: AND(sliding window, OR(causal, same image)). A faster kernel can replace
`paged_attention` behind the same `AttentionMetadata`.

On CUDA (with Triton) the decodes use `paged_decode` instead: a Triton kernel that reads the K/V
blocks in place through the block tables, with a grid that depends only on the batch size and the
longest context the engine allows, so it can be captured in a CUDA graph. Each sequence's keys are
cut into leaves (the kernel's keys per step) and nodes of several leaves (flash-decoding). A leaf's
softmax sums are merged into its node's, and the nodes into the row's result, always in key order
and with the same merge function. Small batches run one program per leaf (the combine kernel merges
the leaves into nodes), large ones one per node (the program merges its leaves): the same
operations either way, so a row's result depends on its own context only, never on the batch or
on the grid it was launched with.

The prefill chunks of a step use `paged_prefill` on CUDA: one launch for all of them (flash
attention over the paged cache, variable lengths, tiles of query rows of one sequence each, keys
read in place through the block table, tensor-core products in the cache's dtype and float32 sums;
float32 caches use exact float32 products). Image runs enter it as a per-row key limit: a row sees
the keys up to its own position, or up to the end of the image run it belongs to.
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass, field

import torch

from gemma_serve.engine.pdl import pdl_launch

try:  # CUDA builds of PyTorch ship Triton; CPU-only installs use the PyTorch path alone.
    import triton
    import triton.language as tl

    from gemma_serve.engine.pdl import pdl_wait
except ImportError:  # pragma: no cover - depends on the install
    triton = None

# Most float32 scores one prefill tile holds (heads x query rows x keys): 256 MiB.
_MAX_TILE_SCORES = 1 << 26


@dataclass
class AttentionMetadata:
    """Where the step's T new tokens come from and where their K/V go; B sequences.

    Sequences are ordered decodes first: sequence i < num_decodes owns exactly token i. The new
    tokens of a sequence are the last `query_len` of its context, so position p of sequence i is
    computed against keys 0..p (and only the last `window` of them on sliding layers).
    """

    slot_mapping: torch.Tensor  # [T] flat cache slot (block * block_size + offset) of each new token
    block_tables: torch.Tensor  # [B, max_blocks] block ids, padded with 0
    context_lens: torch.Tensor  # [B] tokens in the cache after this step (history + new)
    query_start: torch.Tensor  # [B + 1] offsets of each sequence's tokens in the flat batch
    num_decodes: int
    max_decode_context_len: int
    # Host copies, so the prefill loop needs no device round trip.
    query_start_host: list[int]
    context_lens_host: list[int]
    # Keys per node of the Triton decode kernel: fixed per engine (from its max_model_len), so that
    # results do not depend on the step's longest context or batch.
    decode_node_len: int = 256
    # Per sequence, the [start, end) positions of the image-token runs among its new tokens, whose
    # tokens attend to each other bidirectionally; None when the step has no image tokens. The
    # scheduler puts a whole run in one step, so a run's later tokens are always in this step.
    image_spans_host: list[list[tuple[int, int]]] | None = None
    # The sliding-window layers' pool (BlockManager's window pool): its block tables and the new
    # tokens' slots there; None when every layer uses the tables above.
    window_block_tables: torch.Tensor | None = None
    window_slot_mapping: torch.Tensor | None = None
    # Device tensors derived once per step and shared by every layer (the prefill kernel's tiles).
    derived: dict = field(default_factory=dict, repr=False, compare=False)

    @property
    def num_seqs(self) -> int:
        return len(self.context_lens_host)

    def for_window(self) -> AttentionMetadata:
        """The metadata of a sliding-window layer: the window pool's tables and slots (itself when
        there is no window pool). Made once per step; shares `derived` (nothing in it depends on
        the tables)."""
        if self.window_block_tables is None:
            return self
        meta = self.derived.get("window")
        if meta is None:
            meta = dataclasses.replace(self, block_tables=self.window_block_tables,
                                       slot_mapping=self.window_slot_mapping, derived=self.derived)
            self.derived["window"] = meta
        return meta

    def key_limits_host(self) -> list[int]:
        """Per flat row: the last key position it may see (its own position, or the end of the image
        run that holds it). Rows of decodes included, for a [T] layout."""
        limits: list[int] = []
        starts = self.query_start_host
        for i in range(self.num_seqs):
            length = starts[i + 1] - starts[i]
            first = self.context_lens_host[i] - length
            row = list(range(first, first + length))
            for a, b in (self.image_spans_host[i] if self.image_spans_host else ()):
                for p in range(max(a, first), min(b, first + length)):
                    row[p - first] = b - 1
            limits.extend(row)
        return limits


@dataclass(frozen=True)
class KernelTiles:
    """Tile sizes of the attention kernels: query rows per program (prefill), keys per inner step."""

    block_m: int
    block_n: int
    num_warps: int
    num_stages: int = 2


def write_kv(k_cache: torch.Tensor, v_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
             slot_mapping: torch.Tensor) -> None:
    """Store the new tokens' keys and values. Caches are [num_blocks, block_size, kv_heads, head_dim]."""
    kv_heads, head_dim = k_cache.shape[-2:]
    k_cache.view(-1, kv_heads, head_dim).index_copy_(0, slot_mapping, k.to(k_cache.dtype))
    v_cache.view(-1, kv_heads, head_dim).index_copy_(0, slot_mapping, v.to(v_cache.dtype))


def paged_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, meta: AttentionMetadata,
                    scale: float, window: int | None = None, softcap: float | None = None) -> torch.Tensor:
    """q: [T, heads, head_dim] of the new tokens, whose K/V are already written. Returns [T, heads, head_dim]."""
    out = torch.empty_like(q)
    nd = meta.num_decodes
    if nd and use_decode_kernel(q.device):
        paged_decode(q[:nd], k_cache, v_cache, meta.block_tables[:nd], meta.context_lens[:nd],
                     meta.max_decode_context_len, scale, window, softcap, meta.decode_node_len, out[:nd])
    elif nd:
        out[:nd] = _decode(q[:nd], k_cache, v_cache, meta.block_tables[:nd], meta.context_lens[:nd],
                           meta.max_decode_context_len, scale, window, softcap)
    if meta.num_seqs > nd and use_prefill_kernel(q.device):
        paged_prefill(q, k_cache, v_cache, meta, scale, window, softcap, out)
        return out
    starts = meta.query_start_host
    for i in range(nd, meta.num_seqs):
        a, b = starts[i], starts[i + 1]
        spans = meta.image_spans_host[i] if meta.image_spans_host else None
        out[a:b] = _prefill(q[a:b], k_cache, v_cache, meta.block_tables[i], meta.context_lens_host[i],
                            scale, window, softcap, spans)
    return out


def _gather(cache: torch.Tensor, block_tables: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """cache rows at `positions` ([..., n] token positions) of each sequence -> [..., n, kv_heads, D]."""
    block_size, kv_heads, head_dim = cache.shape[1:]
    slots = block_tables.gather(-1, positions // block_size) * block_size + positions % block_size
    return cache.view(-1, kv_heads, head_dim)[slots]


def _scores(q: torch.Tensor, k: torch.Tensor, scale: float, softcap: float | None) -> torch.Tensor:
    scores = torch.matmul(q, k) * scale
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    return scores


def _decode(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
            context_lens: torch.Tensor, max_context_len: int, scale: float, window: int | None,
            softcap: float | None) -> torch.Tensor:
    """One query per sequence, at position context_len - 1. q: [B, heads, D]."""
    batch, heads, head_dim = q.shape
    kv_heads = k_cache.shape[2]
    span = min(window, max_context_len) if window else max_context_len
    # Keys [first, first + span) of each sequence: its window, or its whole context.
    first = (context_lens - span).clamp(min=0)
    positions = first[:, None] + torch.arange(span, device=q.device)[None, :]
    valid = positions < context_lens[:, None]
    positions = torch.where(valid, positions, torch.zeros_like(positions))
    keys = _gather(k_cache, block_tables, positions).float()  # [B, span, kv, D]
    values = _gather(v_cache, block_tables, positions).float()
    qh = q.float().view(batch, kv_heads, heads // kv_heads, head_dim)
    scores = _scores(qh, keys.permute(0, 2, 3, 1), scale, softcap)  # [B, kv, group, span]
    scores = scores.masked_fill(~valid[:, None, None, :], float("-inf"))
    out = torch.matmul(torch.softmax(scores, dim=-1), values.transpose(1, 2))  # [B, kv, group, D]
    return out.reshape(batch, heads, head_dim).to(q.dtype)


def _image_groups(first_key: int, context_len: int, spans: list[tuple[int, int]],
                  device: torch.device) -> torch.Tensor:
    """For key positions first_key..context_len-1: the index of the image run holding each, or -1."""
    groups = torch.full((context_len - first_key,), -1, dtype=torch.long, device=device)
    for j, (a, b) in enumerate(spans):
        lo, hi = max(a, first_key) - first_key, min(b, context_len) - first_key
        if lo < hi:
            groups[lo:hi] = j
    return groups


def _prefill(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_table: torch.Tensor,
             context_len: int, scale: float, window: int | None, softcap: float | None,
             image_spans: list[tuple[int, int]] | None = None) -> torch.Tensor:
    """The last L positions of one sequence of `context_len` tokens, causal except within image runs
    (bidirectional). q: [L, heads, D]."""
    length, heads, head_dim = q.shape
    kv_heads = k_cache.shape[2]
    group = heads // kv_heads
    device = q.device
    first_query = context_len - length
    first_key = max(0, first_query - window + 1) if window else 0
    key_pos = torch.arange(first_key, context_len, device=device)
    keys = _gather(k_cache, block_table, key_pos).float()  # [S, kv, D]
    values = _gather(v_cache, block_table, key_pos).float()
    kh = keys.permute(1, 2, 0)[:, None]  # [kv, 1, D, S]
    vh = values.permute(1, 0, 2)[:, None]  # [kv, 1, S, D]
    qh = q.float().view(length, kv_heads, group, head_dim).permute(1, 2, 0, 3)  # [kv, group, L, D]
    out = torch.empty(length, heads, head_dim, dtype=q.dtype, device=device)
    # Queries are the last positions of the key range, so one group vector serves both.
    groups = _image_groups(first_key, context_len, image_spans, device) if image_spans else None
    tile = max(1, _MAX_TILE_SCORES // (heads * key_pos.numel()))
    for a in range(0, length, tile):
        b = min(length, a + tile)
        q_pos = torch.arange(first_query + a, first_query + b, device=device)[:, None]
        allowed = key_pos[None, :] <= q_pos
        if groups is not None:
            q_groups = groups[first_query - first_key + a:first_query - first_key + b, None]
            allowed |= (q_groups == groups[None, :]) & (q_groups >= 0)
        if window:
            allowed &= q_pos - key_pos[None, :] < window
        scores = _scores(qh[:, :, a:b], kh, scale, softcap).masked_fill(~allowed, float("-inf"))
        part = torch.matmul(torch.softmax(scores, dim=-1), vh)  # [kv, group, tile, D]
        out[a:b] = part.permute(2, 0, 1, 3).reshape(b - a, heads, head_dim).to(q.dtype)
    return out


# --- Triton paged decode ------------------------------------------------------------------------

# At most this many nodes per sequence; the node length grows with max_model_len beyond that.
MAX_DECODE_NODES = 16
# H200, Gemma 3 4B shapes, batch 256 at 512 keys, one layer (step_profile): splits of 64 keys with
# 64-key steps read K/V at 40% of the copy rate, 128 / 32 / 3 stages at 61%, 256 / 32 / 3 stages at
# 68% (one program per 256-key node). At batch 1 such long units leave most SMs idle: there each
# program takes one leaf of DECODE_BLOCK_N keys, and the combine kernel folds the leaves.
# Eleventh H200 run (`step_profile --decode-sweep-only`, combine included): 512-key nodes against
# 256 take 134 / 198 / 86 us against 139 / 204 / 90 at batch 256 x 512 keys, 256 x 768 and 128 x
# 640, but 55 against 50 us at 64 x 640; W2 (`w2_variants --fresh-engines`, node_len=512)
# 15,667 / 15,664 tok/s against 15,125 / 15,497. One program per row (all its nodes, no combine)
# was slower at every batch of 128+ (145-222 us), and is on branch `s11-experiments`.
# Twelfth/thirteenth runs: 1024-key nodes 131.7 / 190.6 / 83.2 / 54.3 us on the same four shapes
# (0.5-3.4 us faster than 512) and W2 15,993 / 15,983 tok/s against 15,785 / 15,924 (one engine per
# run). Small batches take leaf mode either way, so W1 does not see the node length.
MIN_DECODE_NODE_LEN = 1024
DECODE_BLOCK_N = 32
DECODE_STAGES = 3
# Leaf mode (one program per leaf) while the batch leaves SMs idle in node mode: up to this many
# (sequence, KV head) pairs, and this many bytes of float32 leaf partials.
LEAF_MODE_MAX_PAIRS = 256
LEAF_MODE_MAX_BYTES = 64 << 20
# bf16/fp16 caches: tensor-core dots in the decode kernel (else float32 products on the CUDA cores).
# Measured on an H100 (Gemma 3 4B shapes): 7.9 vs 12.4 us a layer at batch 1, equal at batch 256.
DECODE_TENSOR_CORES = os.environ.get("GEMMA_DECODE_TENSOR_CORES", "1") == "1"


def decode_kernel_available() -> bool:
    return triton is not None


def use_decode_kernel(device: torch.device) -> bool:
    return triton is not None and device.type == "cuda"


def decode_node_len(max_model_len: int) -> int:
    """Keys per node: a power of two >= MIN_DECODE_NODE_LEN such that max_model_len needs at most
    MAX_DECODE_NODES nodes."""
    need = -(-max_model_len // MAX_DECODE_NODES)
    return max(MIN_DECODE_NODE_LEN, 1 << max(0, need - 1).bit_length())


def _decode_block_n(group_pad: int, head_dim: int, node_len: int) -> int:
    """Keys per inner iteration: the [group, keys, head_dim] float32 products stay in registers."""
    n = 8192 // (group_pad * head_dim)
    return max(16, min(64, node_len, 1 << (n.bit_length() - 1) if n > 0 else 16))


def use_leaf_mode(batch: int, heads: int, kv_heads: int, head_dim: int, max_leaves: int, leaves_per_node: int) -> bool:
    """One program per leaf (the combine folds leaves into nodes) rather than one per node: for
    batches too small to fill the GPU with nodes. Either gives the same bits, so this is speed only."""
    partial_bytes = batch * heads * max_leaves * (head_dim + 2) * 4
    return leaves_per_node > 1 and batch * kv_heads <= LEAF_MODE_MAX_PAIRS and partial_bytes <= LEAF_MODE_MAX_BYTES


if triton is not None:

    @triton.jit
    def _tanh(x):
        return 2.0 * tl.sigmoid(2.0 * x) - 1.0

    @triton.jit
    def _paged_kv_block(K, V, BT, seq, stride_bt, kvh, start, hi, d, PAGE: tl.constexpr, KV_HEADS: tl.constexpr,
                        HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr):
        """Keys start..start+BLOCK_N of sequence `seq` for KV head `kvh`, read in place through its
        block table: (positions [N], which of them are < hi [N], K [N, D], V [N, D]); the masked
        rows are 0. Both kernels read the cache here, so only this function knows its layout."""
        n = start + tl.arange(0, BLOCK_N)
        nmask = n < hi
        blk = tl.load(BT + seq * stride_bt + n // PAGE, mask=nmask, other=0).to(tl.int64)
        offs = (blk * PAGE + n % PAGE)[:, None] * (KV_HEADS * HEAD_DIM) + kvh * HEAD_DIM + d[None, :]
        k = tl.load(K + offs, mask=nmask[:, None], other=0.0)
        v = tl.load(V + offs, mask=nmask[:, None], other=0.0)  # issued with K: both loads in flight
        return n, nmask, k, v

    @triton.jit
    def _merge_softmax(m_a, l_a, acc_a, m_b, l_b, acc_b):
        """Two partial softmax sums (max, sum of exps, weighted values) of disjoint key sets -> theirs
        together. The one function that merges, in the decode kernel (leaves into a node) and in the
        combine kernel (leaves into nodes, nodes into the row): explicit FMAs, so both compile to the
        same operations and a row's result does not depend on which kernel merged what. `a` may be
        empty (max -inf, sums 0); `b` never is."""
        m = tl.maximum(m_a, m_b)
        wa = tl.exp(m_a - m)
        wb = tl.exp(m_b - m)
        l = tl.fma(l_b, wb, l_a * wa)
        acc = tl.fma(acc_b, wb[:, None], acc_a * wa[:, None])
        return m, l, acc

    # Arguments that change from step to step are not specialised on their values (Triton compiles a
    # variant for ints equal to 1 or divisible by 16): otherwise a new variant could be compiled, for
    # half a second, in the middle of serving.
    # stride_bt (the block table's width) changes from step to step: specialising on it (1, a
    # multiple of 16, other) made eager steps compile new variants in the middle of serving.
    @triton.jit(do_not_specialize=["stride_bt", "max_units", "unit_len"])
    def _paged_decode_kernel(Q, K, V, BT, CTX, PACC, PM, PL,
                             stride_qb, stride_qh, stride_bt,
                             scale, softcap, window, max_units, unit_len,
                             NUM_HEADS: tl.constexpr, KV_HEADS: tl.constexpr, GROUP: tl.constexpr,
                             G_PAD: tl.constexpr, HEAD_DIM: tl.constexpr, PAGE: tl.constexpr,
                             BLOCK_N: tl.constexpr, HAS_WINDOW: tl.constexpr,
                             HAS_SOFTCAP: tl.constexpr, USE_DOT: tl.constexpr, PDL: tl.constexpr = False):
        """Partial softmax sums of one unit of a row's keys for one KV head's query group. A unit is
        a leaf (BLOCK_N keys) or a node (unit_len keys: its leaves merged in order). Leaves start at
        the row's first visible key, so a leaf's keys, and its sums, never depend on the grid. The
        unit length is a runtime value: both modes run one compiled kernel, so a leaf's sums come
        from the same instructions in either (a compile-time branch could lay them out differently)."""
        seq = tl.program_id(0)
        kvh = tl.program_id(1)
        unit = tl.program_id(2)
        # Before the wait: the context lengths are made at the start of the step (pdl.py); the
        # kernel before this one writes q and the new key's cache slot, read below.
        ctx = tl.load(CTX + seq).to(tl.int32)
        pdl_wait(PDL)
        if HAS_WINDOW:
            first = tl.maximum(ctx - window, 0)
        else:
            first = ctx * 0
        lo = first + unit * unit_len
        hi = tl.minimum(lo + unit_len, ctx)
        g = tl.arange(0, G_PAD)
        d = tl.arange(0, HEAD_DIM)
        gmask = g < GROUP
        heads = kvh * GROUP + g
        if lo < hi:
            q = tl.load(Q + seq * stride_qb + heads[:, None] * stride_qh + d[None, :], mask=gmask[:, None],
                        other=0.0)
            if not USE_DOT:
                q = q.to(tl.float32)
            m_i = tl.full([G_PAD], float("-inf"), tl.float32)
            l_i = tl.zeros([G_PAD], tl.float32)
            acc = tl.zeros([G_PAD, HEAD_DIM], tl.float32)
            for start in range(lo, hi, BLOCK_N):
                n, nmask, k, v = _paged_kv_block(K, V, BT, seq, stride_bt, kvh, start, hi, d, PAGE, KV_HEADS,
                                                 HEAD_DIM, BLOCK_N)  # k, v: [N, D]
                if USE_DOT:  # tensor cores, 16-bit operands (the group padded to 16 rows), float32 sums
                    s = tl.dot(q, tl.trans(k)) * scale  # [G, N]
                else:  # float32 products and sums, as the PyTorch path
                    s = tl.sum(q[:, None, :] * k[None, :, :].to(tl.float32), axis=2) * scale
                if HAS_SOFTCAP:
                    s = _tanh(s / softcap) * softcap
                s = tl.where(nmask[None, :], s, float("-inf"))
                # The leaf on its own (its max, its sums), then merged into the unit's.
                m_leaf = tl.max(s, axis=1)
                p = tl.exp(s - m_leaf[:, None])
                l_leaf = tl.sum(p, axis=1)
                if USE_DOT:
                    pv = tl.dot(p.to(v.dtype), v)
                else:
                    pv = tl.sum(p[:, :, None] * v[None, :, :].to(tl.float32), axis=1)
                # Into an empty unit (leaf mode) this is exact: the leaf's own sums.
                m_i, l_i, acc = _merge_softmax(m_i, l_i, acc, m_leaf, l_leaf, pv)
            part = (seq * NUM_HEADS + heads) * max_units + unit  # [G]
            tl.store(PACC + part[:, None] * HEAD_DIM + d[None, :], acc, mask=gmask[:, None])
            tl.store(PM + part, m_i, mask=gmask)
            tl.store(PL + part, l_i, mask=gmask)

    @triton.jit(do_not_specialize=["max_units"])
    def _decode_combine_kernel(PACC, PM, PL, CTX, O, stride_ob, stride_oh, window, max_units,
                               NUM_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, HAS_WINDOW: tl.constexpr,
                               LEAF_LEN: tl.constexpr, NODE_LEN: tl.constexpr, LEAF_UNITS: tl.constexpr,
                               LEAF_CHUNK: tl.constexpr, PDL: tl.constexpr = False):
        """A row's units merged in order. Leaf units (LEAF_UNITS) are first merged into nodes, as the
        decode kernel merges them itself for node units; then the nodes into the row's result."""
        seq = tl.program_id(0)
        head = tl.program_id(1)
        ctx = tl.load(CTX + seq).to(tl.int32)  # made at the start of the step: read before the wait
        pdl_wait(PDL)
        if HAS_WINDOW:
            first = tl.maximum(ctx - window, 0)
        else:
            first = ctx * 0
        keys = ctx - first
        base = (seq * NUM_HEADS + head) * max_units
        d = tl.arange(0, HEAD_DIM)
        m_row = tl.full([1], float("-inf"), tl.float32)
        l_row = tl.zeros([1], tl.float32)
        acc_row = tl.zeros([1, HEAD_DIM], tl.float32)
        num_leaves = tl.cdiv(keys, LEAF_LEN)
        c = tl.arange(0, LEAF_CHUNK)
        for node in range(0, tl.cdiv(keys, NODE_LEN)):
            if LEAF_UNITS:
                m_n = tl.full([1], float("-inf"), tl.float32)
                l_n = tl.zeros([1], tl.float32)
                acc_n = tl.zeros([1, HEAD_DIM], tl.float32)
                # The node's leaves, LEAF_CHUNK per load (one memory round trip, not one per leaf);
                # each leaf taken out of the tile exactly (a max or sum against -inf / 0) and merged
                # in order, as the decode kernel merges them.
                for chunk in range(node * (NODE_LEN // LEAF_LEN), tl.minimum((node + 1) * (NODE_LEN // LEAF_LEN),
                                                                            num_leaves), LEAF_CHUNK):
                    live = chunk + c < num_leaves
                    t_m = tl.load(PM + base + chunk + c, mask=live, other=float("-inf"))
                    t_l = tl.load(PL + base + chunk + c, mask=live, other=0.0)
                    t_acc = tl.load(PACC + (base + chunk + c)[:, None] * HEAD_DIM + d[None, :], mask=live[:, None],
                                    other=0.0)
                    for j in tl.static_range(LEAF_CHUNK):
                        if chunk + j < num_leaves:
                            pick = c == j
                            m_n, l_n, acc_n = _merge_softmax(
                                m_n, l_n, acc_n, tl.max(tl.where(pick, t_m, float("-inf")), axis=0)[None],
                                tl.sum(tl.where(pick, t_l, 0.0), axis=0)[None],
                                tl.sum(tl.where(pick[:, None], t_acc, 0.0), axis=0)[None, :])
            else:
                m_n = tl.load(PM + base + node + tl.zeros([1], tl.int32))
                l_n = tl.load(PL + base + node + tl.zeros([1], tl.int32))
                acc_n = tl.load(PACC + (base + node) * HEAD_DIM + d)[None, :]
            m_row, l_row, acc_row = _merge_softmax(m_row, l_row, acc_row, m_n, l_n, acc_n)
        out = acc_row / l_row[:, None]
        tl.store(O + seq * stride_ob + head * stride_oh + d[None, :], out.to(O.dtype.element_ty))


def paged_decode(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                 context_lens: torch.Tensor, max_context_len: int, scale: float, window: int | None,
                 softcap: float | None, node_len: int, out: torch.Tensor, tensor_cores: bool | None = None,
                 tiles: KernelTiles | None = None, leaf_mode: bool | None = None) -> torch.Tensor:
    """One query per sequence at position context_len - 1, read from the paged cache in place.
    q, out: [B, heads, D] (last dim contiguous); block_tables [B, >= blocks needed]; context_lens [B] >= 1.
    `max_context_len` only sizes the grid (an upper bound of context_lens): CUDA graphs pass the
    engine's max_model_len. `node_len` (fixed per engine) and the leaf length (the kernel's keys per
    step) fix the order in which a row's sums are formed; the grid (one program per leaf or per
    node, `leaf_mode`: default from `use_leaf_mode`) does not change any result.
    `tensor_cores` (16-bit caches only; default DECODE_TENSOR_CORES): scores and P @ V on tensor
    cores, P rounded to the cache dtype. `tiles` overrides keys per step, warps and stages
    (benchmarks; block_m is unused). Writes `out` and returns it."""
    batch, heads, head_dim = q.shape
    _, page, kv_heads, _ = k_cache.shape
    group = heads // kv_heads
    if (head_dim & (head_dim - 1) or q.stride(-1) != 1 or out.stride(-1) != 1 or block_tables.stride(-1) != 1
            or not k_cache.is_contiguous() or not v_cache.is_contiguous()):
        raise ValueError("paged_decode needs a power-of-two head_dim, contiguous caches and contiguous last dims")
    if node_len & (node_len - 1):
        raise ValueError("decode node length must be a power of two")
    span = min(window, max_context_len) if window else max_context_len
    if tensor_cores is None:
        tensor_cores = DECODE_TENSOR_CORES
    use_dot = tensor_cores and k_cache.dtype in (torch.bfloat16, torch.float16) and q.dtype == k_cache.dtype
    group_pad = triton.next_power_of_2(group)
    warps, stages = 4, None
    if use_dot:
        group_pad, block_n, stages = max(16, group_pad), min(DECODE_BLOCK_N, node_len), DECODE_STAGES
    else:
        block_n = _decode_block_n(group_pad, head_dim, node_len)
    if tiles is not None:
        block_n, warps, stages = min(tiles.block_n, node_len), tiles.num_warps, tiles.num_stages
    if batch == 0:
        return out
    max_leaves = max(1, math.ceil(span / block_n))
    if leaf_mode is None:
        leaf_mode = use_leaf_mode(batch, heads, kv_heads, head_dim, max_leaves, node_len // block_n)
    unit_len = block_n if leaf_mode else node_len
    max_units = max_leaves if leaf_mode else max(1, math.ceil(span / node_len))
    common = dict(NUM_HEADS=heads, HEAD_DIM=head_dim, HAS_WINDOW=window is not None)
    part_acc = torch.empty(batch, heads, max_units, head_dim, dtype=torch.float32, device=q.device)
    part_m = torch.empty(batch, heads, max_units, dtype=torch.float32, device=q.device)
    part_l = torch.empty_like(part_m)
    _paged_decode_kernel[(batch, kv_heads, max_units)](
        q, k_cache, v_cache, block_tables, context_lens, part_acc, part_m, part_l,
        q.stride(0), q.stride(1), block_tables.stride(0),
        float(scale), float(softcap or 1.0), int(window or 0), max_units, unit_len,
        KV_HEADS=kv_heads, GROUP=group, G_PAD=group_pad, PAGE=page, BLOCK_N=block_n,
        HAS_SOFTCAP=softcap is not None, USE_DOT=use_dot, num_warps=warps,
        **({} if stages is None else {"num_stages": stages}), **common, **pdl_launch(q))
    _decode_combine_kernel[(batch, heads)](
        part_acc, part_m, part_l, context_lens, out, out.stride(0), out.stride(1), int(window or 0), max_units,
        LEAF_LEN=block_n, NODE_LEN=node_len, LEAF_UNITS=unit_len != node_len,
        LEAF_CHUNK=min(8, node_len // block_n),
        num_warps=1 if head_dim <= 128 else 2, **common, **pdl_launch(q))
    return out


# --- Triton paged prefill -----------------------------------------------------------------------

# The prefill kernel on CUDA (GEMMA_PREFILL_KERNEL=0 falls back to the PyTorch path, for comparison).
PREFILL_KERNEL = os.environ.get("GEMMA_PREFILL_KERNEL", "1") == "1"


def prefill_tiles(head_dim: int, dtype: torch.dtype) -> KernelTiles:
    """Tiles that keep a [block_m, head_dim] float32 accumulator and the query in registers."""
    if dtype == torch.float32:
        return KernelTiles(32, 32, 4 if head_dim <= 128 else 8, 1)
    if head_dim <= 128:
        return KernelTiles(64, 64, 4)
    # H200, Gemma 3 4B shapes, 16 x 512-token prompts: 0.147 ms a layer (64x32 w8: 0.215, 64x64 w8: 0.195).
    return KernelTiles(64, 32, 4)


def use_prefill_kernel(device: torch.device) -> bool:
    return PREFILL_KERNEL and triton is not None and device.type == "cuda"


def _prefill_work(meta: AttentionMetadata, block_m: int, device: torch.device
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(sequence, first flat row) of every query tile of the prefill sequences, and the per-row key
    limits when the step has image runs. Built once per step on the host, shared by all layers."""
    key = ("prefill", block_m, device)
    if key not in meta.derived:
        seqs, rows = [], []
        starts = meta.query_start_host
        for i in range(meta.num_decodes, meta.num_seqs):
            for row in range(starts[i], starts[i + 1], block_m):
                seqs.append(i)
                rows.append(row)
        # One copy for both rows; the row length padded to 4 entries keeps the second row 16-byte
        # aligned, so Triton never compiles a variant for an unaligned pointer mid-serving.
        n = len(seqs)
        pad = -n % 4
        work = torch.tensor([seqs + [0] * pad, rows + [0] * pad], dtype=torch.int32).to(device, non_blocking=True)
        limits = None
        if meta.image_spans_host and any(meta.image_spans_host):
            limits = torch.tensor(meta.key_limits_host(), dtype=torch.int32).to(device, non_blocking=True)
        meta.derived[key] = (work[0, :n], work[1, :n], limits)
    return meta.derived[key]


if triton is not None:

    @triton.jit(do_not_specialize=["stride_bt"])  # as the decode kernel's
    def _paged_prefill_kernel(Q, K, V, BT, QS, CTX, TILE_SEQ, TILE_ROW, LIMIT, O,
                              stride_qt, stride_qh, stride_bt, stride_ot, stride_oh,
                              scale, softcap, window,
                              KV_HEADS: tl.constexpr, GROUP: tl.constexpr, HEAD_DIM: tl.constexpr,
                              PAGE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                              HAS_WINDOW: tl.constexpr, HAS_SOFTCAP: tl.constexpr, HAS_LIMIT: tl.constexpr,
                              IEEE: tl.constexpr, PDL: tl.constexpr = False):
        pdl_wait(PDL)
        tile = tl.program_id(0)
        head = tl.program_id(1)
        kvh = head // GROUP
        seq = tl.load(TILE_SEQ + tile)
        row0 = tl.load(TILE_ROW + tile)
        q_begin = tl.load(QS + seq).to(tl.int32)
        q_end = tl.load(QS + seq + 1).to(tl.int32)
        ctx = tl.load(CTX + seq).to(tl.int32)
        first_pos = ctx - (q_end - q_begin)  # position of the sequence's first new token
        rows = row0 + tl.arange(0, BLOCK_M)
        rmask = rows < q_end
        pos = first_pos + rows - q_begin
        d = tl.arange(0, HEAD_DIM)
        q = tl.load(Q + rows[:, None].to(tl.int64) * stride_qt + head * stride_qh + d[None, :],
                    mask=rmask[:, None], other=0.0)
        if HAS_LIMIT:
            limit = tl.load(LIMIT + rows, mask=rmask, other=0)
        else:
            limit = pos
        hi = tl.minimum(tl.max(tl.where(rmask, limit, 0), axis=0) + 1, ctx)
        if HAS_WINDOW:
            lo = tl.maximum(first_pos + row0 - q_begin - window + 1, 0)
        else:
            lo = hi * 0
        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
        for start in range(lo, hi, BLOCK_N):
            n, nmask, k, v = _paged_kv_block(K, V, BT, seq, stride_bt, kvh, start, hi, d, PAGE, KV_HEADS, HEAD_DIM,
                                             BLOCK_N)
            if IEEE:
                s = tl.dot(q, tl.trans(k), input_precision="ieee") * scale
            else:
                s = tl.dot(q, tl.trans(k)) * scale
            if HAS_SOFTCAP:
                s = _tanh(s / softcap) * softcap
            allowed = (n[None, :] <= limit[:, None]) & nmask[None, :]
            if HAS_WINDOW:
                allowed = allowed & (pos[:, None] - n[None, :] < window)
            s = tl.where(allowed, s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, axis=1))
            # A row with no allowed key yet keeps m = -inf: subtract 0 instead (exp(-inf) = 0, no NaN).
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            alpha = tl.exp(m_i - m_safe)
            p = tl.exp(s - m_safe[:, None])
            l_i = l_i * alpha + tl.sum(p, axis=1)
            if IEEE:
                acc = acc * alpha[:, None] + tl.dot(p, v, input_precision="ieee")
            else:
                acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
            m_i = m_new
        out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
        tl.store(O + rows[:, None].to(tl.int64) * stride_ot + head * stride_oh + d[None, :],
                 out.to(O.dtype.element_ty), mask=rmask[:, None])


def paged_prefill(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, meta: AttentionMetadata,
                  scale: float, window: int | None, softcap: float | None, out: torch.Tensor,
                  tiles: KernelTiles | None = None) -> torch.Tensor:
    """Attention of every prefill row of the step (sequences num_decodes.. of `meta`), read from the
    paged cache in place, into `out` ([T, heads, D], the decode rows untouched). The new rows' K/V
    must already be in the cache. `tiles` overrides the tile sizes (benchmarks)."""
    _, heads, head_dim = q.shape
    _, page, kv_heads, _ = k_cache.shape
    if (head_dim & (head_dim - 1) or head_dim < 16 or q.stride(-1) != 1 or out.stride(-1) != 1
            or not k_cache.is_contiguous() or not v_cache.is_contiguous()):
        raise ValueError("paged_prefill needs a power-of-two head_dim >= 16, contiguous caches and last dims")
    tiles = tiles or prefill_tiles(head_dim, k_cache.dtype)
    tile_seq, tile_row, limits = _prefill_work(meta, tiles.block_m, q.device)
    if tile_seq.numel() == 0:
        return out
    block_tables = meta.block_tables
    if block_tables.stride(-1) != 1:
        block_tables = block_tables.contiguous()
    _paged_prefill_kernel[(tile_seq.numel(), heads)](
        q, k_cache, v_cache, block_tables, meta.query_start, meta.context_lens, tile_seq, tile_row,
        limits if limits is not None else tile_row, out,
        q.stride(0), q.stride(1), block_tables.stride(0), out.stride(0), out.stride(1),
        float(scale), float(softcap or 1.0), int(window or 0),
        KV_HEADS=kv_heads, GROUP=heads // kv_heads, HEAD_DIM=head_dim, PAGE=page, BLOCK_M=tiles.block_m,
        BLOCK_N=tiles.block_n, HAS_WINDOW=window is not None, HAS_SOFTCAP=softcap is not None,
        HAS_LIMIT=limits is not None, IEEE=k_cache.dtype == torch.float32,
        num_warps=tiles.num_warps, num_stages=tiles.num_stages, **pdl_launch(q))
    return out
