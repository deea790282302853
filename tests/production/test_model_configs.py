"""Every rendered config.pbtxt parses with Triton's own ModelConfig schema, and the tensorrt_llm one
carries the settings and the engine's facts."""

from pathlib import Path

from gemma_serve.settings import ServingSettings
from gemma_serve.triton.repository import PORTABLE_MODEL, render_portable_repository
from gemma_serve.triton.trtllm_repository import (
    TENSORRT_LLM_MODEL,
    EngineModelParams,
    render_tensorrt_llm_repository,
)
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2


def parse(path: Path) -> model_config_pb2.ModelConfig:
    return text_format.Parse(path.read_text(), model_config_pb2.ModelConfig())


def params(path="/engines/gemma 7b", **kw) -> EngineModelParams:
    return EngineModelParams(engine_dir=Path(path), **{"max_batch_size": 64, "enable_kv_cache_reuse": True, **kw})


def test_portable_config_parses(tmp_path):
    root = render_portable_repository(ServingSettings.load({"model": "/m"}, environ={}), tmp_path)
    config = parse(root / PORTABLE_MODEL / "config.pbtxt")
    assert config.backend == "python" and config.model_transaction_policy.decoupled


def test_tensorrt_llm_config_parses_and_carries_the_settings(tmp_path):
    settings = ServingSettings.load({
        "kv_cache_free_gpu_mem_fraction": 0.8, "enable_kv_cache_reuse": True, "max_queue_delay_microseconds": 250,
        "batch_scheduler_policy": "max_utilization", "max_queue_len": 100}, environ={})
    root = render_tensorrt_llm_repository(settings, params('/engines/a "quoted" path'), tmp_path)
    assert (root / TENSORRT_LLM_MODEL / "1").is_dir()
    config = parse(root / TENSORRT_LLM_MODEL / "config.pbtxt")
    p = {k: v.string_value for k, v in config.parameters.items()}

    assert config.name == TENSORRT_LLM_MODEL and config.backend == "tensorrtllm"
    assert config.model_transaction_policy.decoupled
    assert config.max_batch_size == 64
    assert config.dynamic_batching.max_queue_delay_microseconds == 250
    assert config.dynamic_batching.default_queue_policy.max_queue_size == 100
    assert p["gpt_model_path"] == '/engines/a "quoted" path'
    assert p["gpt_model_type"] == "inflight_fused_batching"
    assert p["max_beam_width"] == "1"
    assert p["exclude_input_in_output"] == "true"
    assert p["kv_cache_free_gpu_mem_fraction"] == "0.8"
    assert p["enable_kv_cache_reuse"] == "true"
    assert p["batch_scheduler_policy"] == "max_utilization"
    assert p["executor_worker_path"] == "/opt/tritonserver/backends/tensorrtllm/trtllmExecutorWorker"
    # Unset optional knobs are left out, so the backend uses its defaults (no "${...}" placeholders).
    assert "max_tokens_in_paged_kv_cache" not in p and "max_attention_window_size" not in p
    assert not any("${" in v for v in p.values())


def test_tensorrt_llm_optional_parameters(tmp_path):
    settings = ServingSettings.load({"max_tokens_in_paged_kv_cache": 65536}, environ={})
    root = render_tensorrt_llm_repository(
        settings, params(enable_kv_cache_reuse=False, attention_window=(512, 512, 4096)), tmp_path)
    p = {k: v.string_value for k, v in parse(root / TENSORRT_LLM_MODEL / "config.pbtxt").parameters.items()}
    assert p["max_tokens_in_paged_kv_cache"] == "65536"
    assert p["max_attention_window_size"] == "512,512,4096"
    assert p["enable_kv_cache_reuse"] == "false"


def test_settings_engine_knobs_and_tokenizer_alias():
    s = ServingSettings.load({"engine": "auto", "engine_repository": "org/engine",
                              "tokenizer_repository": "google/gemma-7b-it"},
                             environ={"GEMMA_SERVE_KV_CACHE_FREE_GPU_MEM_FRACTION": "0.5",
                                      "GEMMA_SERVE_ENABLE_KV_CACHE_REUSE": "false"})
    assert s.engine == "auto" and s.engine_repository == "org/engine"
    assert s.tokenizer_path == "google/gemma-7b-it"
    assert s.kv_cache_free_gpu_mem_fraction == 0.5 and s.enable_kv_cache_reuse is False
    # An explicit tokenizer wins over the alias.
    s = ServingSettings.load({"tokenizer": "a", "tokenizer_repository": "b"}, environ={})
    assert s.tokenizer_path == "a"


def test_production_docs_describe_every_setting():
    docs = (Path(__file__).resolve().parents[2] / "docs" / "production.md").read_text()
    missing = [name for name in ServingSettings.model_fields if f"| `{name}` |" not in docs]
    assert not missing, f"docs/production.md's model_metadata table lacks {missing}"
