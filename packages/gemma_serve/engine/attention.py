"""Attention over the paged KV cache, for a flattened batch that mixes decodes and prefill chunks.

This is the portable reference path in plain PyTorch (any device), computed in float32:

- decodes (sequences with one new token, placed first in the batch) are attended together: each
  one's keys and values are gathered through its block table into a padded [batch, span] layout;
- prefill chunks are attended one sequence at a time, queries in tiles, so memory stays bounded by
  one tile's scores whatever mix of lengths the step holds (padding every sequence to the longest
  query would need batch x longest_query x context scores).

Sliding-window layers only gather the keys inside the window. A faster kernel can replace
`paged_attention` behind the same `AttentionMetadata`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

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

    @property
    def num_seqs(self) -> int:
        return len(self.context_lens_host)


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
    if nd:
        out[:nd] = _decode(q[:nd], k_cache, v_cache, meta.block_tables[:nd], meta.context_lens[:nd],
                           meta.max_decode_context_len, scale, window, softcap)
    starts = meta.query_start_host
    for i in range(nd, meta.num_seqs):
        a, b = starts[i], starts[i + 1]
        out[a:b] = _prefill(q[a:b], k_cache, v_cache, meta.block_tables[i], meta.context_lens_host[i],
                            scale, window, softcap)
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


def _prefill(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_table: torch.Tensor,
             context_len: int, scale: float, window: int | None, softcap: float | None) -> torch.Tensor:
    """The last L positions of one sequence of `context_len` tokens, causal. q: [L, heads, D]."""
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
    tile = max(1, _MAX_TILE_SCORES // (heads * key_pos.numel()))
    for a in range(0, length, tile):
        b = min(length, a + tile)
        q_pos = torch.arange(first_query + a, first_query + b, device=device)[:, None]
        allowed = key_pos[None, :] <= q_pos
        if window:
            allowed &= q_pos - key_pos[None, :] < window
        scores = _scores(qh[:, :, a:b], kh, scale, softcap).masked_fill(~allowed, float("-inf"))
        part = torch.matmul(torch.softmax(scores, dim=-1), vh)  # [kv, group, tile, D]
        out[a:b] = part.permute(2, 0, 1, 3).reshape(b - a, heads, head_dim).to(q.dtype)
    return out
