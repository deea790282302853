"""The Triton paged prefill kernel against the PyTorch path (`attention._prefill`, float32) on steps
that mix decodes, whole prompts and chunks that start mid-context: GQA, head_dim up to 256, sliding
windows, soft-capping and image runs (bidirectional within a run). Without a GPU the float32 cases
run in Triton's interpreter."""

import pytest
import torch
from gemma_serve.engine import attention
from gemma_serve.engine.attention import AttentionMetadata, paged_attention, paged_prefill

from tests.gpu.kernel_device import DEVICE, ON_GPU, generator, needs_gpu

pytestmark = [pytest.mark.gpu, pytest.mark.interpretable]

# (context after the step, new tokens): two decodes first, then prefills of several shapes.
STEP = [(9, 1), (40, 1), (1, 1 + 0), (70, 70), (200, 33), (130, 129), (17, 5)]


def build_step(seqs, heads, kv_heads, dim, page, dtype, images=None, seed=0):
    gen = generator(seed)
    num_blocks = 512
    k_cache = torch.randn(num_blocks, page, kv_heads, dim, device=DEVICE, generator=gen).to(dtype)
    v_cache = torch.randn(num_blocks, page, kv_heads, dim, device=DEVICE, generator=gen).to(dtype)
    perm = torch.randperm(num_blocks, device=DEVICE, generator=gen).tolist()
    tables, starts, ctxs = [], [0], []
    for ctx, n in seqs:
        tables.append([perm.pop() for _ in range(-(-ctx // page))])
        starts.append(starts[-1] + n)
        ctxs.append(ctx)
    num_decodes = next(i for i, (_, n) in enumerate(seqs) if n > 1)
    width = max(len(t) for t in tables)
    q = torch.randn(starts[-1], heads, dim, device=DEVICE, generator=gen).to(dtype)
    meta = AttentionMetadata(
        slot_mapping=torch.zeros(starts[-1], dtype=torch.long, device=DEVICE),
        block_tables=torch.tensor([t + [0] * (width - len(t)) for t in tables], device=DEVICE),
        context_lens=torch.tensor(ctxs, device=DEVICE), query_start=torch.tensor(starts, device=DEVICE),
        num_decodes=num_decodes, max_decode_context_len=max(ctxs[:num_decodes]), query_start_host=starts,
        context_lens_host=ctxs, image_spans_host=images)
    return q, k_cache, v_cache, meta


def reference(q, k_cache, v_cache, meta, scale, window, softcap):
    out = torch.zeros(q.shape, dtype=torch.float32, device=DEVICE)
    starts = meta.query_start_host
    for i in range(meta.num_decodes, meta.num_seqs):
        a, b = starts[i], starts[i + 1]
        spans = meta.image_spans_host[i] if meta.image_spans_host else None
        out[a:b] = attention._prefill(q[a:b].float(), k_cache.float(), v_cache.float(), meta.block_tables[i],
                                      meta.context_lens_host[i], scale, window, softcap, spans)
    return out


def rel_err(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("heads,kv_heads,dim,page", [(4, 2, 16, 4), (8, 4, 256, 16), (4, 1, 128, 16), (2, 2, 64, 8)])
@pytest.mark.parametrize("window,softcap", [(None, None), (37, None), (5, 2.0)])
def test_prefill_kernel_matches_pytorch_path(dtype, heads, kv_heads, dim, page, window, softcap):
    needs_gpu(dtype)
    q, k_cache, v_cache, meta = build_step(STEP, heads, kv_heads, dim, page, dtype, seed=dim + page)
    scale = dim ** -0.5
    out = torch.zeros_like(q)
    paged_prefill(q, k_cache, v_cache, meta, scale, window, softcap, out)
    ref = reference(q, k_cache, v_cache, meta, scale, window, softcap)
    first = meta.query_start_host[meta.num_decodes]
    assert out[:first].abs().max() == 0, "the kernel wrote decode rows"
    if dtype == torch.float32:
        torch.testing.assert_close(out[first:], ref[first:], rtol=1e-4, atol=1e-4)
    else:
        # bf16 products and P rounded to bf16 before P @ V, float32 sums.
        assert rel_err(out[first:].float(), ref[first:]) < 1e-2


@pytest.mark.parametrize("window", [None, 6])
def test_prefill_kernel_image_runs_are_bidirectional(window):
    # Sequence 1: a run at positions 3..10 of a whole prompt; sequence 2: a chunk that starts at 20
    # and holds the run 22..27; sequence 3: no image.
    seqs = [(12, 1), (40, 40), (30, 10), (25, 25)]
    images = [[], [(3, 11)], [(22, 28)], []]
    q, k_cache, v_cache, meta = build_step(seqs, 4, 2, 32, 4, torch.float32, images)
    out = torch.zeros_like(q)
    paged_prefill(q, k_cache, v_cache, meta, 0.2, window, None, out)
    ref = reference(q, k_cache, v_cache, meta, 0.2, window, None)
    first = meta.query_start_host[1]
    torch.testing.assert_close(out[first:], ref[first:], rtol=1e-4, atol=1e-4)
    # And it differs from plain causal attention on the image rows (the limits were used).
    plain = torch.zeros_like(q)
    meta_plain = build_step(seqs, 4, 2, 32, 4, torch.float32)[3]
    paged_prefill(q, k_cache, v_cache, meta_plain, 0.2, window, None, plain)
    row = meta.query_start_host[1] + 3
    assert not torch.allclose(plain[row], out[row])


def test_paged_attention_uses_kernel_and_decode_rows_stay_decode():
    """Through `paged_attention`: decode rows from the decode kernel, prefill rows from this one,
    both equal to the PyTorch path on the same step."""
    if not ON_GPU:
        pytest.skip("paged_attention picks the kernels for CUDA tensors only")
    q, k_cache, v_cache, meta = build_step(STEP, 8, 4, 256, 16, torch.float32)
    fast = paged_attention(q, k_cache, v_cache, meta, 0.0625, 37, None)
    old = attention.PREFILL_KERNEL
    try:
        attention.PREFILL_KERNEL = False
        slow = paged_attention(q, k_cache, v_cache, meta, 0.0625, 37, None)
    finally:
        attention.PREFILL_KERNEL = old
    torch.testing.assert_close(fast, slow, rtol=1e-4, atol=1e-4)

