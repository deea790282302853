"""The paged decode kernel (`attention.paged_decode`) against the PyTorch path: GQA, head_dim up to
256, sliding windows, soft-capping, float32 and bf16 caches, CUDA cores and tensor cores; and the
same bits whatever the grid (sized by the longest context allowed) and whether one program runs per
leaf or per node. Without a GPU the float32 cases run in Triton's interpreter."""

import pytest
import torch
from gemma_serve.engine import attention

from tests.gpu.kernel_device import DEVICE, ON_GPU, generator, needs_gpu

pytestmark = [pytest.mark.gpu, pytest.mark.interpretable]

# The grid of a CUDA-graphed step is sized for the engine's max_model_len; the interpreter runs
# every program in Python, so it gets a shorter one.
LONG = 4096 if ON_GPU else 1024
# Keys per node: 512 is the engine's default, 1024 what max_model_len above 8,192 gets (and a
# candidate default, docs/benchmarks.md twelfth run); the interpreter skips 1024 for time.
NODE_LENS = (64, 256, 512, 1024) if ON_GPU else (64, 256, 512)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


@pytest.mark.parametrize("dtype,tensor_cores", [(torch.float32, False), (torch.bfloat16, False),
                                                (torch.bfloat16, True)])
@pytest.mark.parametrize("heads,kv_heads,dim,page", [(4, 2, 16, 4), (8, 4, 256, 16), (4, 1, 128, 16), (2, 2, 64, 8)])
@pytest.mark.parametrize("window,softcap", [(None, None), (37, None), (5, 2.0)])
def test_paged_decode_kernel_matches_pytorch_path(dtype, tensor_cores, heads, kv_heads, dim, page, window, softcap):
    needs_gpu(dtype, tensor_cores)
    gen = generator(heads * dim + page)
    num_blocks = 256
    k_cache = torch.randn(num_blocks, page, kv_heads, dim, device=DEVICE, generator=gen).to(dtype)
    v_cache = torch.randn(num_blocks, page, kv_heads, dim, device=DEVICE, generator=gen).to(dtype)
    ctx = [1, 2, page, page + 1, 63, 64, 65, 200, 7 * page + 3]
    perm = torch.randperm(num_blocks, device=DEVICE, generator=gen).tolist()
    width = max(-(-c // page) for c in ctx)
    tables = []
    for c in ctx:
        t = [perm.pop() for _ in range(-(-c // page))]
        tables.append(t + [0] * (width - len(t)))
    tables = torch.tensor(tables, device=DEVICE)
    lens = torch.tensor(ctx, device=DEVICE)
    q = torch.randn(len(ctx), heads, dim, device=DEVICE, generator=gen).to(dtype)
    scale = dim ** -0.5
    # Reference: the PyTorch path in float32 on the same (rounded) values.
    ref = attention._decode(q.float(), k_cache.float(), v_cache.float(), tables, lens, max(ctx), scale, window,
                            softcap)
    outs = {}
    for node_len in NODE_LENS:
        for max_len in (max(ctx), LONG):
            for leaf_mode in (False, True):
                out = torch.full_like(q, float("nan"))
                attention.paged_decode(q, k_cache, v_cache, tables, lens, max_len, scale, window, softcap, node_len,
                                       out, tensor_cores=tensor_cores, leaf_mode=leaf_mode)
                assert not out.isnan().any()
                assert rel_err(out, ref) < (1e-5 if dtype == torch.float32 else 8e-3)
                outs[node_len, max_len, leaf_mode] = out
    # Neither the grid (sized by the longest context allowed) nor one program per leaf or per node
    # changes any result: the node length alone fixes how the sums are formed.
    for node_len in NODE_LENS:
        first = outs[node_len, max(ctx), False]
        for key, out in outs.items():
            if key[0] == node_len:
                assert torch.equal(out, first), key
