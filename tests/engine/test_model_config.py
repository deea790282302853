"""`ModelConfig` reads config.json as transformers' own config classes do: every field the decoder
uses, for the tiny test configs, the published Gemma configs and a bare multimodal config."""

import json
from pathlib import Path

import pytest
from gemma_serve.engine.model_config import ModelConfig
from transformers import CONFIG_MAPPING

from .conftest import make_config

SHARED_MODELS = Path(__file__).resolve().parents[3] / "shared" / "models"
PUBLISHED = ["gemma-7b-it", "gemma-2-2b-it", "gemma-3-4b-it"]


def published(name: str) -> dict:
    path = SHARED_MODELS / f"{name}.config.json"
    if not path.exists():
        pytest.skip(f"{path} not present")
    return json.loads(path.read_text())


def assert_matches_transformers(raw: dict) -> ModelConfig:
    ours = ModelConfig.from_dict(raw)
    hf = CONFIG_MAPPING[raw["model_type"]].from_dict(raw)
    text = hf.get_text_config()
    assert (ours.vocab_size, ours.hidden_size, ours.intermediate_size) == (
        text.vocab_size, text.hidden_size, text.intermediate_size)
    assert (ours.num_layers, ours.num_heads, ours.num_kv_heads, ours.head_dim) == (
        text.num_hidden_layers, text.num_attention_heads, text.num_key_value_heads, text.head_dim)
    assert ours.rms_norm_eps == text.rms_norm_eps
    assert ours.max_position_embeddings == text.max_position_embeddings
    assert ours.query_pre_attn_scalar == (getattr(text, "query_pre_attn_scalar", None) or text.head_dim)
    assert ours.attn_logit_softcapping == getattr(text, "attn_logit_softcapping", None)
    assert ours.final_logit_softcapping == getattr(text, "final_logit_softcapping", None)
    layer_types = getattr(text, "layer_types", None) or ["full_attention"] * text.num_hidden_layers
    assert ours.sliding == tuple(t == "sliding_attention" for t in layer_types)
    if any(ours.sliding):
        assert ours.sliding_window == text.sliding_window
    # transformers 5 turns rope_theta / rope_local_base_freq / rope_scaling into rope_parameters.
    rope = text.rope_parameters
    full, local = (rope["full_attention"], rope["sliding_attention"]) if "full_attention" in rope else (rope, rope)
    assert ours.rope_theta == full["rope_theta"]
    assert ours.rope_local_theta == local["rope_theta"]
    assert ours.rope_scaling_factor == (full["factor"] if full["rope_type"] == "linear" else 1.0)
    assert local["rope_type"] == "default"
    assert ours.sandwich_norms == (ours.generation >= 2) and ours.qk_norm == (ours.generation == 3)
    return ours


@pytest.mark.parametrize("generation", ["gemma1", "gemma2", "gemma3", "gemma3_mm"])
def test_tiny_configs_match_transformers(generation):
    assert_matches_transformers(make_config(generation).to_dict())


@pytest.mark.parametrize("name", PUBLISHED)
def test_published_configs_match_transformers(name):
    assert_matches_transformers(published(name))


def test_published_shapes():
    g3 = ModelConfig.from_dict(published("gemma-3-4b-it"))
    assert g3.is_multimodal and g3.model_type == "gemma3_text"
    assert g3.num_layers == 34 and g3.sliding.count(False) == 5 and not g3.sliding[5] and g3.sliding[6]
    assert g3.rope_scaling_factor == 8.0 and g3.rope_local_theta == 10_000.0 and g3.rope_theta == 1_000_000.0
    assert g3.eos_token_ids == (1, 106) and g3.sliding_window == 1024 and g3.torch_dtype == "bfloat16"
    g2 = ModelConfig.from_dict(published("gemma-2-2b-it"))
    assert g2.attn_logit_softcapping == 50.0 and g2.final_logit_softcapping == 30.0
    assert g2.sliding[0] and not g2.sliding[1] and g2.sliding_window == 4096
    g1 = ModelConfig.from_dict(published("gemma-7b-it"))
    assert g1.generation == 1 and not any(g1.sliding) and g1.sliding_window is None
    assert g1.query_pre_attn_scalar == 256 and g1.eos_token_ids == (1,)


def test_multimodal_config_without_text_fields_gets_transformers_defaults():
    raw = {"model_type": "gemma3", "text_config": {"hidden_size": 640, "num_hidden_layers": 7}}
    ours = assert_matches_transformers(raw)
    assert ours.num_layers == 7 and ours.vocab_size == 262208 and ours.sliding_window == 4096


def test_layer_types_in_the_json_win_over_the_pattern():
    raw = published("gemma-3-4b-it")
    text = dict(raw["text_config"], num_hidden_layers=3,
                layer_types=["full_attention", "sliding_attention", "full_attention"])
    ours = assert_matches_transformers(dict(raw, text_config=text))
    assert ours.sliding == (False, True, False)


def test_unsupported_model_type_is_refused():
    with pytest.raises(ValueError, match="unsupported model_type 'llama'"):
        ModelConfig.from_dict({"model_type": "llama"})
