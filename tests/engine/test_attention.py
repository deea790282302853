"""Paged attention against a dense per-position reference, on a step that mixes decodes, a whole
prompt and a chunk that starts mid-context; GQA, sliding windows and soft-capping. A faster kernel
that replaces `paged_attention` must pass the same test."""

import pytest
import torch
from gemma_serve.engine import attention
from gemma_serve.engine.attention import AttentionMetadata, paged_attention, write_kv

HEADS, KV_HEADS, DIM, BLOCK = 4, 2, 8, 4


def reference(q, keys, values, first_pos, scale, window, softcap):
    """q: [L, H, D] at positions first_pos.., keys/values: [ctx, KV, D] of the whole context."""
    group = HEADS // KV_HEADS
    out = torch.empty_like(q)
    for i in range(q.shape[0]):
        p = first_pos + i
        lo = max(0, p - window + 1) if window else 0
        k = keys[lo:p + 1].repeat_interleave(group, dim=1)  # [n, H, D]
        v = values[lo:p + 1].repeat_interleave(group, dim=1)
        s = torch.einsum("hd,nhd->hn", q[i], k) * scale
        if softcap:
            s = torch.tanh(s / softcap) * softcap
        out[i] = torch.einsum("hn,nhd->hd", s.softmax(-1), v)
    return out


@pytest.mark.parametrize("window", [None, 5])
@pytest.mark.parametrize("softcap", [None, 2.0])
def test_mixed_step_matches_dense_reference(window, softcap, monkeypatch):
    monkeypatch.setattr(attention, "_MAX_TILE_SCORES", HEADS * 3 * 40)  # several query tiles per prefill
    gen = torch.Generator().manual_seed(0)
    # (context length after the step, new tokens): three decodes, a whole prompt, a mid-context chunk.
    seqs = [(5, 1), (17, 1), (30, 1), (13, 13), (27, 7)]
    num_blocks = 64
    k_cache = torch.randn(num_blocks, BLOCK, KV_HEADS, DIM, generator=gen)  # garbage where unwritten
    v_cache = torch.randn(num_blocks, BLOCK, KV_HEADS, DIM, generator=gen)
    free = torch.randperm(num_blocks, generator=gen).tolist()
    tables, new_q, slots, refs = [], [], [], []
    scale = DIM ** -0.5
    for ctx, n in seqs:
        table = [free.pop() for _ in range(-(-ctx // BLOCK))]
        tables.append(table)
        keys = torch.randn(ctx, KV_HEADS, DIM, generator=gen)
        values = torch.randn(ctx, KV_HEADS, DIM, generator=gen)
        seq_slots = torch.tensor([table[p // BLOCK] * BLOCK + p % BLOCK for p in range(ctx)])
        write_kv(k_cache, v_cache, keys[:ctx - n], values[:ctx - n], seq_slots[:ctx - n])  # history
        q = torch.randn(n, HEADS, DIM, generator=gen)
        new_q.append(q)
        slots.append(seq_slots[ctx - n:])
        refs.append((keys, values, ctx - n))
    # This step's new K/V are written first, as the model does.
    for (keys, values, first), s in zip(refs, slots):
        write_kv(k_cache, v_cache, keys[first:], values[first:], s)
    width = max(len(t) for t in tables)
    starts = [0]
    for _, n in seqs:
        starts.append(starts[-1] + n)
    ctx_lens = [c for c, _ in seqs]
    meta = AttentionMetadata(
        slot_mapping=torch.cat(slots), block_tables=torch.tensor([t + [0] * (width - len(t)) for t in tables]),
        context_lens=torch.tensor(ctx_lens), query_start=torch.tensor(starts), num_decodes=3,
        max_decode_context_len=30, query_start_host=starts, context_lens_host=ctx_lens)
    out = paged_attention(torch.cat(new_q), k_cache, v_cache, meta, scale, window, softcap)
    for i, (q, (keys, values, first)) in enumerate(zip(new_q, refs)):
        ref = reference(q, keys, values, first, scale, window, softcap)
        torch.testing.assert_close(out[starts[i]:starts[i + 1]], ref, rtol=1e-5, atol=1e-5)


def test_key_limits_extend_image_rows_to_the_end_of_their_run():
    # Sequence 0: a decode at position 9; 1: a whole prompt of 12 with an image at 3..7; 2: a chunk
    # at positions 20..24 holding the end of a run 18..22 (its start came in an earlier step).
    starts = [0, 1, 13, 18]
    meta = AttentionMetadata(
        slot_mapping=torch.zeros(18, dtype=torch.long), block_tables=torch.zeros(3, 8, dtype=torch.long),
        context_lens=torch.tensor([10, 12, 25]), query_start=torch.tensor(starts), num_decodes=1,
        max_decode_context_len=10, query_start_host=starts, context_lens_host=[10, 12, 25],
        image_spans_host=[[], [(3, 8)], [(18, 23)]])
    limits = meta.key_limits_host()
    assert limits[0] == 9
    assert limits[1:13] == [0, 1, 2, 7, 7, 7, 7, 7, 8, 9, 10, 11]
    assert limits[13:] == [22, 22, 22, 23, 24]


def test_prefill_work_tiles_each_sequence_and_keeps_rows_aligned():
    starts = [0, 1, 2, 102, 105]  # two decodes, then prefills of 100 and 3 tokens
    meta = AttentionMetadata(
        slot_mapping=torch.zeros(105, dtype=torch.long), block_tables=torch.zeros(4, 8, dtype=torch.long),
        context_lens=torch.tensor([5, 7, 100, 40]), query_start=torch.tensor(starts), num_decodes=2,
        max_decode_context_len=7, query_start_host=starts, context_lens_host=[5, 7, 100, 40])
    seqs, rows, limits = attention._prefill_work(meta, 32, torch.device("cpu"))
    assert seqs.tolist() == [2, 2, 2, 2, 3] and rows.tolist() == [2, 34, 66, 98, 102]
    assert limits is None  # no image runs: the kernel uses each row's own position
    assert rows.data_ptr() % 16 == 0  # both rows of one copy; the second 16-byte aligned
    assert attention._prefill_work(meta, 32, torch.device("cpu"))[1] is rows  # built once per step
