"""Tiny random Gemma 1/2/3 checkpoints made with transformers, so the engine is checked against the
reference implementation on the same weights."""

import os

import pytest
import torch
from gemma_serve.engine.config import EngineConfig
from gemma_serve.engine.llm_engine import LLMEngine
from transformers import AutoModelForCausalLM, Gemma2Config, Gemma3Config, Gemma3TextConfig, GemmaConfig

COMMON = dict(vocab_size=320, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
              num_key_value_heads=2, head_dim=16, max_position_embeddings=512, eos_token_id=1, pad_token_id=0)


def make_config(generation: str):
    if generation == "gemma1":
        return GemmaConfig(**COMMON)
    if generation == "gemma2":
        return Gemma2Config(**COMMON, sliding_window=8, query_pre_attn_scalar=16, attn_logit_softcapping=50.0,
                            final_logit_softcapping=30.0)
    text = dict(**COMMON, sliding_window=8, query_pre_attn_scalar=16,
                layer_types=["sliding_attention", "full_attention", "sliding_attention", "full_attention"],
                rope_scaling={"rope_type": "linear", "factor": 8.0}, rope_local_base_freq=10000.0)
    if generation == "gemma3":
        return Gemma3TextConfig(**text)
    # The multimodal layout (as google/gemma-3-4b-it): text weights under model.language_model.
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                  image_size=28, patch_size=14)
    return Gemma3Config(text_config=text, vision_config=vision, mm_tokens_per_image=1, image_token_index=300,
                        boi_token_index=301, eoi_token_index=302)


def _init(model) -> None:
    """Random weights with a twist: a random model with tied embeddings mostly copies its input token
    under greedy decoding. The final norm scaled by -1 (Gemma multiplies by 1 + weight) makes each
    step move to another token, so greedy comparisons cover many different tokens."""
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("model.norm.weight", "language_model.norm.weight")):
                p.fill_(-2.0)
            elif "norm" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
            else:
                p.copy_(torch.randn(p.shape, generator=gen) * (0.5 if "embed" in name else 0.15))


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory):
    """generation -> (folder, transformers model in float32)."""
    out = {}
    for generation in ("gemma1", "gemma2", "gemma3", "gemma3_mm"):
        torch.manual_seed(0)
        config = make_config(generation)
        if generation == "gemma3_mm":
            from transformers import Gemma3ForConditionalGeneration

            config._attn_implementation = "eager"
            model = Gemma3ForConditionalGeneration(config)
        else:
            # Eager attention: transformers' SDPA path skips Gemma 2's attention soft-capping.
            model = AutoModelForCausalLM.from_config(config, attn_implementation="eager")
        model = model.float().eval()
        _init(model)
        folder = tmp_path_factory.mktemp(generation)
        model.save_pretrained(folder)
        out[generation] = (folder, model)
    return out


def prompt(seed: int, length: int) -> list[int]:
    """Random prompt token ids below the special ids of the tiny vocabulary."""
    return torch.randint(5, 300, (length,), generator=torch.Generator().manual_seed(seed)).tolist()


# The suite runs on CPU; GEMMA_ENGINE_TEST_DEVICE=cuda runs the same checks on a GPU (float32).
DEVICE = os.environ.get("GEMMA_ENGINE_TEST_DEVICE", "cpu")


def engine_for(folder, **overrides) -> LLMEngine:
    config = dict(model=str(folder), device=DEVICE, dtype="float32", block_size=4, num_kv_blocks=512,
                  max_num_batched_tokens=64, max_num_seqs=16)
    config.update(overrides)
    return LLMEngine(EngineConfig(**config))
