"""Checkpoint loading: sharded safetensors, every published tensor-name layout, hub ids, clear errors."""

import json
import shutil

import huggingface_hub
import pytest
import torch
from gemma_serve.engine.loader import resolve_checkpoint
from gemma_serve.engine.sampling_params import SamplingParams
from safetensors.torch import load_file, save_file

from .conftest import engine_for, prompt

GREEDY = SamplingParams(max_tokens=8, temperature=0.0)


def copy_checkpoint(src, dst, rename=lambda k: k, drop=()):
    dst.mkdir(exist_ok=True)
    shutil.copy(src / "config.json", dst / "config.json")
    tensors = {rename(k): v for k, v in load_file(src / "model.safetensors").items() if k not in drop}
    save_file(tensors, dst / "model.safetensors")
    return tensors


def test_sharded_checkpoint_loads(checkpoints, tmp_path):
    folder, model = checkpoints["gemma3"]
    model.save_pretrained(tmp_path, max_shard_size="100KB")
    assert (tmp_path / "model.safetensors.index.json").exists()
    assert len(list(tmp_path.glob("*.safetensors"))) > 2
    p = prompt(1, 12)
    assert engine_for(tmp_path).generate([p], GREEDY) == engine_for(folder).generate([p], GREEDY)


def test_published_gemma3_layout_loads(checkpoints, tmp_path):
    """google/gemma-3-4b-it names its tensors language_model.model.*, vision_tower.*, and so on."""
    folder, _ = checkpoints["gemma3_mm"]

    def published_name(key: str) -> str:
        return key.replace("model.language_model.", "language_model.model.").replace(
            "model.vision_tower.", "vision_tower.").replace("model.multi_modal_projector.", "multi_modal_projector.")

    tensors = copy_checkpoint(folder, tmp_path, published_name)
    assert any(k.startswith("vision_tower.") for k in tensors)
    assert not any(k.startswith("model.") for k in tensors)
    p = prompt(2, 12)
    assert engine_for(tmp_path).generate([p], GREEDY) == engine_for(folder).generate([p], GREEDY)


def test_missing_folder_weights_and_tensors_are_clear_errors(checkpoints, tmp_path):
    folder, _ = checkpoints["gemma2"]
    with pytest.raises(FileNotFoundError, match="not found"):
        engine_for(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no config.json"):
        engine_for(tmp_path / "empty")
    (tmp_path / "no-weights").mkdir()
    shutil.copy(folder / "config.json", tmp_path / "no-weights" / "config.json")
    with pytest.raises(FileNotFoundError, match="no \\*.safetensors"):
        engine_for(tmp_path / "no-weights")
    copy_checkpoint(folder, tmp_path / "incomplete", drop={"model.layers.1.self_attn.k_proj.weight"})
    with pytest.raises(ValueError, match="layers.1.qkv_proj"):
        engine_for(tmp_path / "incomplete")
    copy_checkpoint(folder, tmp_path / "wrong-shape")
    tensors = load_file(tmp_path / "wrong-shape" / "model.safetensors")
    tensors["model.norm.weight"] = torch.zeros(3)
    save_file(tensors, tmp_path / "wrong-shape" / "model.safetensors")
    with pytest.raises(ValueError, match="model.norm.weight: shape"):
        engine_for(tmp_path / "wrong-shape")


def test_unsupported_model_type_is_a_clear_error(checkpoints, tmp_path):
    folder, _ = checkpoints["gemma1"]
    copy_checkpoint(folder, tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps(dict(config, model_type="llama")))
    with pytest.raises(ValueError, match="unsupported model_type 'llama'"):
        engine_for(tmp_path)


def test_repo_id_is_downloaded_with_token_and_revision(checkpoints, monkeypatch):
    folder, _ = checkpoints["gemma1"]
    calls = []

    def fake_download(repo_id, **kwargs):
        calls.append((repo_id, kwargs))
        return str(folder)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_download)
    assert resolve_checkpoint("google/gemma-7b-it", token="hf_x", revision="main") == folder
    repo, kwargs = calls[0]
    assert repo == "google/gemma-7b-it" and kwargs["token"] == "hf_x" and kwargs["revision"] == "main"
    assert {"*.json", "*.safetensors"} <= set(kwargs["allow_patterns"])

    def failing_download(repo_id, **kwargs):
        raise OSError("401 gated repo")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", failing_download)
    with pytest.raises(FileNotFoundError, match="could not download 'google/gemma-7b-it'.*401"):
        resolve_checkpoint("google/gemma-7b-it")


def test_random_load_format_needs_only_a_config(tmp_path):
    """Benchmarks build real-shape models from config.json alone (no weights to download)."""
    import json

    from gemma_serve.engine.config import EngineConfig
    from gemma_serve.engine.llm_engine import LLMEngine
    from gemma_serve.engine.sampling_params import SamplingParams

    config = {"model_type": "gemma3_text", "vocab_size": 128, "hidden_size": 32, "intermediate_size": 64,
              "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 16,
              "max_position_embeddings": 256, "sliding_window": 8}
    (tmp_path / "config.json").write_text(json.dumps(config))
    engine = LLMEngine(EngineConfig(model=str(tmp_path), device="cpu", load_format="random", num_kv_blocks=32))
    out = engine.generate([[2, 5, 7]], SamplingParams(max_tokens=4, temperature=0.0))[0]
    assert len(out) == 4 and all(0 <= t < 128 for t in out)
