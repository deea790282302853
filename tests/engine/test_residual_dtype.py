"""The residual stream of 16-bit models in float32 (`EngineConfig.float32_residual`): bf16 logits
move closer to the float32 model's on the same weights, and float32 models are left as they are."""

import pytest
import torch
from gemma_serve.engine.config import EngineConfig
from gemma_serve.engine.llm_engine import LLMEngine
from transformers import AutoModelForCausalLM, Gemma3TextConfig

from tests.gpu.test_cuda_graphs import _teacher_forced_decode_logits


@pytest.fixture(scope="module")
def deep_gemma3(tmp_path_factory):
    """A narrow but deep random Gemma 3 (16 layers): the residual stream takes 32 additions."""
    config = Gemma3TextConfig(vocab_size=512, hidden_size=256, intermediate_size=512, num_hidden_layers=16,
                              num_attention_heads=4, num_key_value_heads=2, head_dim=64, max_position_embeddings=512,
                              sliding_window=32, query_pre_attn_scalar=64, eos_token_id=1, pad_token_id=0,
                              rope_local_base_freq=10000.0)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="eager").float()
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            scale = 0.1 if "norm" in name else (0.5 if "embed" in name else 0.06)
            p.copy_(torch.randn(p.shape, generator=gen) * scale)
    folder = tmp_path_factory.mktemp("deep_gemma3")
    model.save_pretrained(folder)
    return folder


def _logits(folder, matmul_out_dtype: str = "default", **overrides) -> list[torch.Tensor]:
    engine = LLMEngine(EngineConfig(model=str(folder), device="cpu", max_model_len=256, num_kv_blocks=64,
                                    max_num_seqs=4, max_num_batched_tokens=256, **overrides))
    if matmul_out_dtype != "default":
        engine.runner.model.set_matmul_out_dtype(matmul_out_dtype)
    gen = torch.Generator().manual_seed(2)
    prompts = [torch.randint(5, 500, (n,), generator=gen).tolist() for n in (40, 13, 90)]
    return engine, _teacher_forced_decode_logits(engine, prompts, 4)


def _rel_err(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    return max(float((x.double() - y.double()).norm() / y.double().norm()) for x, y in zip(a, b))


def test_float32_residual_brings_bf16_logits_closer_to_float32(deep_gemma3):
    fp32, reference = _logits(deep_gemma3, dtype="float32")
    assert fp32.runner.model.residual_dtype is None  # nothing to widen
    errs = {}
    for flag in (False, True):
        engine, logits = _logits(deep_gemma3, dtype="bfloat16", float32_residual=flag)
        assert engine.runner.model.residual_dtype == (torch.float32 if flag else None)
        assert all(x.dtype == torch.float32 for x in logits)
        errs[flag] = _rel_err(logits, reference)
    print(f"bf16 logits vs float32: residual bf16 {errs[False]:.2e}, residual float32 {errs[True]:.2e}")
    assert errs[True] < 0.85 * errs[False], errs


def test_float32_matmul_outputs_bring_bf16_logits_closer_still(deep_gemma3):
    """With the float32 residual stream the projections and the LM head return float32 (their
    accumulators unrounded); gate_up does up to GATE_UP_FLOAT32_MAX_ROWS rows (this test's steps)."""
    _, reference = _logits(deep_gemma3, dtype="float32")
    engine, wide = _logits(deep_gemma3, dtype="bfloat16")
    model = engine.runner.model
    assert model.matmul_out_dtype == torch.float32
    assert all(proj.out_dtype == torch.float32 for layer in model.layers
               for proj in (layer.qkv_proj, layer.o_proj, layer.gate_up_proj, layer.down_proj))
    assert all(layer.gate_up_proj.out_dtype_max_rows == 256 for layer in model.layers)
    _, narrow = _logits(deep_gemma3, None, dtype="bfloat16")
    errs = _rel_err(narrow, reference), _rel_err(wide, reference)
    print(f"bf16 logits vs float32 (float32 residual): 16-bit matmul outputs {errs[0]:.2e}, float32 {errs[1]:.2e}")
    assert errs[1] < 0.9 * errs[0], errs
