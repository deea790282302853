"""The batch-1 decode megakernel (engine/csrc/decode_megakernel.cu, experimental) against a float32
PyTorch reference of the same layers, on random weights in Gemma 3 4B's shapes: the residual
stream after 6 layers (5 sliding, 1 global; sliding window shrunk to 100 so it binds) at context
lengths 1 to 700, and the new token's key and value in the paged cache. Needs a GPU and nvcc."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from gemma_serve.bench.megakernel_reference import check, make_layers
from gemma_serve.engine.megakernel import DecodeMegakernel
from gemma_serve.engine.model_config import ModelConfig

pytestmark = pytest.mark.gpu

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def setup():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    if shutil.which("nvcc") is None and not Path("/usr/local/cuda/bin/nvcc").exists():
        pytest.skip("needs nvcc to build the kernel")
    cfg = ModelConfig.from_dict(json.loads((REPO / "bench" / "configs" / "gemma-3-4b-it" / "config.json").read_text()))
    bs, num_blocks = 16, 60
    layers = make_layers(cfg, 6, num_blocks, bs, 1024, "cuda", seed=3, window=100)
    table = torch.randperm(num_blocks, device="cuda")[:50].to(torch.int32)
    mk = DecodeMegakernel(layers, cfg.num_heads, cfg.num_kv_heads, cfg.rms_norm_eps, cfg.query_pre_attn_scalar ** -0.5,
                          cfg.attn_logit_softcapping, bs)
    return cfg, layers, table, mk, bs


@pytest.mark.parametrize("ctx", [1, 17, 100, 101, 384, 700])
def test_megakernel_matches_reference(setup, ctx: int) -> None:
    cfg, layers, table, mk, bs = setup
    res = check(mk, layers, cfg, ctx, table, bs, "cuda")
    assert res["finite"]
    assert res["cosine"] > 0.9999 and res["rel_max_err"] < 2e-2, res
    assert res["kv_rel_max_err"] < 2e-2, res


def test_megakernel_repeats_bit_for_bit(setup) -> None:
    # No atomics in the sums: the same step twice gives the same bits.
    cfg, layers, table, mk, bs = setup
    hidden = torch.randn(cfg.hidden_size, device="cuda")
    ctx = torch.tensor([300], dtype=torch.int32, device="cuda")
    first = mk.step(hidden, ctx, table).clone()
    second = mk.step(hidden, ctx, table).clone()
    assert torch.equal(first, second)
