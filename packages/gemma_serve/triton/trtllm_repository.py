"""Renders the Triton model repository for TensorRT-LLM's C++ backend from `data/triton/tensorrt_llm/`.

One model, `tensorrt_llm`, named as in NVIDIA's inflight-batcher repository so that the same tensor
contract (`contract.py`) reaches either engine. What varies comes from `ServingSettings`
(config.yaml's model_metadata) and from the engine itself (its batch size and attention windows,
read from engine_build.json by `trtllm_engine.py`).
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import jinja2

from gemma_serve.settings import ServingSettings
from gemma_serve.triton.repository import DEFAULT_DATA_DIR

TENSORRT_LLM_MODEL = "tensorrt_llm"
# Where the NGC image keeps the backend; `executor_worker_path` points into it.
TRTLLM_BACKEND_DIR = Path("/opt/tritonserver/backends/tensorrtllm")


@dataclass(frozen=True)
class EngineModelParams:
    """What the rendered config needs from the engine, beyond the settings."""

    engine_dir: Path
    # The engine's own max_batch_size (trtllm-build --max_batch_size): Triton's batch limit too.
    max_batch_size: int
    enable_kv_cache_reuse: bool
    # Per-layer attention windows, repeated by the backend; empty: every layer attends to all tokens.
    attention_window: tuple[int, ...] = ()


def render_tensorrt_llm_config(settings: ServingSettings, params: EngineModelParams,
                               data_dir: Path = DEFAULT_DATA_DIR) -> str:
    """config.pbtxt of the `tensorrt_llm` model."""
    env = jinja2.Environment(loader=jinja2.FileSystemLoader(str(data_dir / "triton" / TENSORRT_LLM_MODEL)),
                             undefined=jinja2.StrictUndefined, keep_trailing_newline=True)
    template = env.get_template("config.pbtxt.j2")
    return template.render(
        model_name=TENSORRT_LLM_MODEL,
        max_batch_size=params.max_batch_size,
        max_queue_delay_microseconds=settings.max_queue_delay_microseconds,
        max_queue_size=settings.max_queue_len,
        # A JSON string is a valid protobuf text string (same escapes), whatever the path holds.
        engine_dir=json.dumps(str(params.engine_dir)),
        batch_scheduler_policy=settings.batch_scheduler_policy,
        kv_cache_free_gpu_mem_fraction=settings.kv_cache_free_gpu_mem_fraction,
        max_tokens_in_paged_kv_cache=settings.max_tokens_in_paged_kv_cache,
        max_attention_window_size=",".join(str(w) for w in params.attention_window),
        enable_kv_cache_reuse=params.enable_kv_cache_reuse,
        executor_worker_path=str(TRTLLM_BACKEND_DIR / "trtllmExecutorWorker"),
    )


def render_tensorrt_llm_repository(settings: ServingSettings, params: EngineModelParams, out_dir: Path,
                                   data_dir: Path = DEFAULT_DATA_DIR) -> Path:
    """Write `<out_dir>/tensorrt_llm/{config.pbtxt,1/}`; returns the repository root.

    The version folder stays empty: the backend loads the engine from `gpt_model_path`."""
    model_dir = Path(out_dir) / TENSORRT_LLM_MODEL
    if model_dir.exists():
        shutil.rmtree(model_dir)
    (model_dir / "1").mkdir(parents=True)
    (model_dir / "config.pbtxt").write_text(render_tensorrt_llm_config(settings, params, data_dir))
    return Path(out_dir)
