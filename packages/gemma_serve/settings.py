"""Serving settings: one source for the Truss model, the Triton repository and the engine.

Values come from `config.yaml`'s `model_metadata`, then environment variables named
`GEMMA_SERVE_<FIELD>` (upper case) override them, so `make serve MODEL=...` and tests can change a
setting without editing the config.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any, Literal, Mapping

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

if TYPE_CHECKING:
    from gemma_serve.api.images import ImageLimits

ENV_PREFIX = "GEMMA_SERVE_"


class ServingSettings(BaseModel):
    model_config = ConfigDict(extra="ignore", protected_namespaces=())

    # --- model ---
    # Hugging Face repo id or local folder with the weights (portable engine) and tokenizer.
    model: str = "google/gemma-3-4b-it"
    # Tokenizer location when it differs from `model` (TensorRT-LLM engines ship without one).
    tokenizer: str | None = None
    revision: str | None = None
    # The name clients pass as `model` in OpenAI requests; defaults to `model`.
    served_model_name: str | None = None

    # --- engine behind Triton ---
    # "auto": tensorrt_llm when tritonserver has the TensorRT-LLM backend and `engine_repository` is
    # set (the NGC image on Baseten), else portable (`make serve` on a laptop or CI).
    engine: Literal["portable", "tensorrt_llm", "auto"] = "portable"
    device: str = "auto"
    dtype: str = "auto"
    # Weight-only, per-output-channel scales; "fp8" needs a GPU of compute capability 8.9+.
    quantization: Literal["none", "int8", "fp8"] = "none"
    # With int8 / fp8: the tied embedding / LM head is quantized too (engine/quantization.py).
    quantize_lm_head: bool = True
    # "random": real shapes from config.json, random weights (GPU benchmarks without downloads).
    load_format: Literal["auto", "random"] = "auto"
    block_size: int = Field(16, ge=1)
    num_kv_blocks: int | None = Field(None, ge=1)
    kv_cache_memory_fraction: float = Field(0.85, gt=0, le=1)
    cpu_kv_cache_tokens: int = Field(65536, ge=16)
    max_num_seqs: int = Field(256, ge=1)
    max_num_batched_tokens: int = Field(4096, ge=16)
    max_queue_len: int = Field(4096, ge=1)
    enable_prefix_caching: bool = True
    cuda_graphs: bool = True
    # Also graph steps that prefill one prompt chunk of up to 512 tokens (engine/cuda_graphs.py).
    prefill_cuda_graphs: bool = True
    # Sliding-window layers hold only their window of K/V (engine/block_manager.py).
    sliding_window_kv: bool = True
    # Launch a graphed decode step before the previous step's tokens are read (engine/llm_engine.py).
    overlap_steps: bool = True
    # 16-bit models carry the residual stream and the matmul outputs in float32 (engine/models/gemma.py).
    float32_residual: bool = True
    # Where the engine runs. "triton": in tritonserver, reached over gRPC (the product). "inprocess":
    # in this process behind the same API pipeline, no Triton hop (`serve --direct`, the benchmark's
    # baseline for what the serving layers cost; see gemma_serve/direct.py).
    backend: Literal["triton", "inprocess"] = "triton"

    # --- TensorRT-LLM engine (production; see docs/production.md) ---
    # Hugging Face repo id or local folder of an engine built by build_engine.sh (engine_build.json).
    engine_repository: str | None = None
    engine_revision: str | None = None
    # Where the tokenizer comes from when it is not `model` (an alias of `tokenizer`, as Baseten's
    # TensorRT-LLM trusses name it).
    tokenizer_repository: str | None = None
    kv_cache_free_gpu_mem_fraction: float = Field(0.9, gt=0, le=1)
    enable_kv_cache_reuse: bool = True
    max_queue_delay_microseconds: int = Field(0, ge=0)
    batch_scheduler_policy: Literal["guaranteed_no_evict", "max_utilization"] = "guaranteed_no_evict"
    # None: as many tokens as kv_cache_free_gpu_mem_fraction allows.
    max_tokens_in_paged_kv_cache: int | None = Field(None, ge=1)

    # --- request limits and defaults ---
    # Context window (prompt + output); None: the model's, capped at 8192.
    max_model_len: int | None = Field(None, ge=16)
    default_max_tokens: int = Field(256, ge=1)

    # --- images (portable engine, Gemma 3 checkpoints with a vision tower) ---
    # 0 refuses image inputs.
    max_images_per_request: int = Field(8, ge=0)
    max_image_bytes: int = Field(20 * 2**20, ge=1)
    max_image_pixels: int = Field(50_000_000, ge=1)
    image_fetch_timeout_s: float = Field(10.0, gt=0)
    # Let http(s) image URLs point at loopback / private / link-local addresses (local development and
    # tests). Off: a caller could otherwise make the server read its own network.
    image_fetch_allow_private: bool = False

    # --- Triton process ---
    # 0 picks a free port (tests, several servers on one machine).
    triton_grpc_port: int = Field(8001, ge=0)
    triton_http_port: int = Field(8000, ge=0)
    triton_metrics_port: int = Field(8002, ge=0)
    triton_startup_timeout_s: float = Field(600.0, gt=0)
    triton_log_verbose: int = Field(0, ge=0)
    # Where the rendered model repository and tritonserver's log go; None: a fresh temporary folder.
    workdir: str | None = None

    @model_validator(mode="after")
    def _tokenizer_repository_is_tokenizer(self) -> ServingSettings:
        if self.tokenizer_repository and not self.tokenizer:
            self.tokenizer = self.tokenizer_repository
        return self

    @property
    def image_limits(self) -> "ImageLimits":
        from gemma_serve.api.images import ImageLimits

        return ImageLimits(max_images=self.max_images_per_request, max_bytes=self.max_image_bytes,
                           max_pixels=self.max_image_pixels, fetch_timeout_s=self.image_fetch_timeout_s,
                           allow_private_networks=self.image_fetch_allow_private)

    @property
    def tokenizer_path(self) -> str:
        return self.tokenizer or self.model

    @property
    def model_name(self) -> str:
        return self.served_model_name or self.model

    @classmethod
    def load(cls, model_metadata: Mapping[str, Any] | None = None,
             environ: Mapping[str, str] | None = None) -> "ServingSettings":
        """`model_metadata` from config.yaml, overridden by GEMMA_SERVE_* variables."""
        environ = os.environ if environ is None else environ
        values: dict[str, Any] = dict(model_metadata or {})
        for name in cls.model_fields:
            raw = environ.get(ENV_PREFIX + name.upper())
            if raw is not None and raw != "":
                values[name] = None if raw.lower() == "none" else raw
        try:
            return cls.model_validate(values)
        except ValidationError as exc:
            raise ValueError(f"invalid serving settings (config.yaml model_metadata / {ENV_PREFIX}*): {exc}") from exc
