from __future__ import annotations

from dataclasses import dataclass


@dataclass
class EngineConfig:
    """Everything the portable engine needs to start. Filled from the serving settings (config.yaml)."""

    # Hugging Face repo id (downloaded with `hf_token`) or a local folder in Hugging Face layout.
    model: str
    hf_token: str | None = None
    revision: str | None = None
    # "auto": CUDA when available, else CPU.
    device: str = "auto"
    # "auto": the checkpoint's dtype (bf16) on CUDA, float32 on CPU.
    dtype: str = "auto"
    # Tokens per KV-cache block.
    block_size: int = 16
    # Number of KV blocks; None sizes the pool from free memory (`kv_cache_memory_fraction` of free
    # GPU memory, or `cpu_kv_cache_tokens` on CPU).
    num_kv_blocks: int | None = None
    kv_cache_memory_fraction: float = 0.85
    cpu_kv_cache_tokens: int = 65536
    # Most sequences decoding at once, and most tokens (prefill + decode) in one engine step.
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 4096
    # Longest prompt + output; None: the model's max_position_embeddings capped at 8192.
    max_model_len: int | None = None
    # Most requests waiting for a slot before new ones are refused (EngineOverloadedError -> 503).
    max_queue_len: int = 4096
    enable_prefix_caching: bool = True
    # "none" | "int8" | "fp8": weight-only, per-output-channel scales, of the decoder's linear layers
    # (engine/quantization.py); "fp8" needs CUDA with compute capability 8.9+ (Ada, Hopper).
    quantization: str = "none"
    # With quantization "int8" / "fp8": also the tied embedding table (input embeddings and LM head),
    # one scale per vocabulary row (Gemma 3 4B: 1.34 GB of bf16 -> 0.67 GB); False keeps it in the
    # model's dtype.
    quantize_lm_head: bool = True
    # "auto": weights from the checkpoint. "random": only config.json is read and the weights are
    # random with the real shapes (benchmarks on machines that cannot download weights).
    load_format: str = "auto"
    # Sliding-window layers (Gemma 2/3) keep their K/V in a pool of their own and give back the
    # blocks older than the window, so they hold about `sliding_window` tokens per sequence; False
    # keeps every layer's whole context (one pool). Only used when the window < max_model_len.
    sliding_window_kv: bool = True
    # 16-bit models: carry the residual stream (the sum every layer adds to) in float32, so the
    # 34-odd additions are not each rounded to 8 significant bits, and the matmuls return their
    # float32 accumulators (GemmaModel.set_matmul_out_dtype); the matmuls still get 16-bit inputs.
    # False: the residual and the matmul outputs in the model's dtype, as transformers does.
    float32_residual: bool = True
    # Capture decode steps as CUDA graphs (CUDA only).
    cuda_graphs: bool = True
    # With cuda_graphs: also capture steps that prefill one prompt chunk of up to 512 tokens (one
    # user's time to first token is otherwise ~300 kernel launches from Python).
    prefill_cuda_graphs: bool = True
    # Launch a step (graphed decode, or eager prefill / mixed) before reading the previous step's
    # tokens, so the host's work (post-processing, scheduling, preparing) overlaps the GPU's
    # (LLMEngine.step).
    overlap_steps: bool = True
    # AsyncEngine.start() freezes Python's garbage collector's view of everything alive then
    # (gc.freeze: torch, the model, the tokenizer), so a full collection no longer walks it
    # (engine/gc_freeze.py); shutdown() unfreezes.
    freeze_gc: bool = True
    # Gemma 3 images: projected features of recently seen images (by content hash) stay on the device,
    # so a repeated image is not encoded again. Gemma 3 4B: 256 x 2560 bf16 = 1.3 MB per image.
    image_feature_cache_entries: int = 128
    image_feature_cache_bytes: int = 256 * 2**20
