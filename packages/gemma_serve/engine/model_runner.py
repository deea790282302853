"""`ModelRunner`: owns the device. Loads the model, allocates the KV cache, turns a scheduled step
into batch tensors, runs the model and samples."""

from __future__ import annotations

import logging
import time
from contextlib import contextmanager

import torch

from gemma_serve.engine.attention import AttentionMetadata
from gemma_serve.engine.config import EngineConfig
from gemma_serve.engine.loader import load_weights, resolve_checkpoint
from gemma_serve.engine.model_config import ModelConfig
from gemma_serve.engine.models.gemma import GemmaModel
from gemma_serve.engine.sampler import SampleResult, sample
from gemma_serve.engine.scheduler import ScheduledChunk

logger = logging.getLogger(__name__)

# Context window when neither the config nor the model sets a smaller one.
DEFAULT_MAX_MODEL_LEN = 8192
_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
           "float16": torch.float16, "fp16": torch.float16}


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device 'cuda' was asked for, but no CUDA GPU is available")
    return device


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if name not in _DTYPES:
        raise ValueError(f"unknown dtype {name!r}; use one of auto, {', '.join(_DTYPES)}")
    return _DTYPES[name]


@contextmanager
def _default_dtype(dtype: torch.dtype):
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


class ModelRunner:
    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        self.device = resolve_device(config.device)
        self.dtype = resolve_dtype(config.dtype, self.device)
        folder = resolve_checkpoint(config.model, config.hf_token, config.revision)
        self.model_config = ModelConfig.from_folder(folder)
        cfg = self.model_config
        self.max_model_len = config.max_model_len or min(cfg.max_position_embeddings, DEFAULT_MAX_MODEL_LEN)
        start = time.monotonic()
        with torch.device(self.device), _default_dtype(self.dtype):
            self.model = GemmaModel(cfg, self.max_model_len)
        load_weights(self.model, folder)
        if config.quantization != "none":
            raise ValueError(f"quantization {config.quantization!r} is not available in this engine build yet")
        self.model.eval()
        logger.info("loaded %s (Gemma %d, %d layers) on %s in %s in %.1f s", folder, cfg.generation, cfg.num_layers,
                    self.device, self.dtype, time.monotonic() - start)
        self.block_size = config.block_size
        self.num_blocks = self._num_blocks()
        shape = (self.num_blocks, self.block_size, cfg.num_kv_heads, cfg.head_dim)
        self.kv_caches = [(torch.zeros(shape, dtype=self.dtype, device=self.device),
                           torch.zeros(shape, dtype=self.dtype, device=self.device)) for _ in range(cfg.num_layers)]
        tokens = self.num_blocks * self.block_size
        logger.info("KV cache: %d blocks of %d tokens = %d tokens (%.1f sequences of max_model_len %d)",
                    self.num_blocks, self.block_size, tokens, tokens / self.max_model_len, self.max_model_len)

    def _block_bytes(self) -> int:
        cfg = self.model_config
        return 2 * cfg.num_layers * self.block_size * cfg.num_kv_heads * cfg.head_dim * torch.finfo(self.dtype).bits // 8

    def _num_blocks(self) -> int:
        if self.config.num_kv_blocks:
            return self.config.num_kv_blocks
        if self.device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(self.device)
            return max(1, int(free * self.config.kv_cache_memory_fraction) // self._block_bytes())
        return max(1, self.config.cpu_kv_cache_tokens // self.block_size)

    @torch.inference_mode()
    def run(self, chunks: list[ScheduledChunk]) -> SampleResult | None:
        """Compute the step; sample one token for every chunk that reaches its sequence's end."""
        ids, positions, slots, starts, ctx_lens, tables, logit_rows = [], [], [], [0], [], [], []
        bs = self.block_size
        for chunk in chunks:
            seq = chunk.seq
            end = chunk.start + chunk.num_tokens
            ids.extend(seq.token_ids[chunk.start:end])
            positions.extend(range(chunk.start, end))
            slots.extend(seq.block_table[p // bs] * bs + p % bs for p in range(chunk.start, end))
            starts.append(starts[-1] + chunk.num_tokens)
            ctx_lens.append(end)
            tables.append(seq.block_table)
            if chunk.samples:
                logit_rows.append(starts[-1] - 1)
        dev = self.device
        width = max(len(t) for t in tables)
        block_tables = torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.long, device=dev)
        q_lens = [b - a for a, b in zip(starts[:-1], starts[1:])]
        max_q = max(q_lens)
        query_index = torch.tensor([[a + min(j, n - 1) for j in range(max_q)] for a, n in zip(starts[:-1], q_lens)],
                                   dtype=torch.long, device=dev)
        query_valid = torch.arange(max_q, device=dev)[None, :] < torch.tensor(q_lens, device=dev)[:, None]
        meta = AttentionMetadata(
            slot_mapping=torch.tensor(slots, dtype=torch.long, device=dev),
            query_start=torch.tensor(starts, dtype=torch.long, device=dev),
            context_lens=torch.tensor(ctx_lens, dtype=torch.long, device=dev),
            block_tables=block_tables,
            max_query_len=max_q,
            max_context_len=max(ctx_lens),
            query_index=query_index,
            query_valid=query_valid,
        )
        input_ids = torch.tensor(ids, dtype=torch.long, device=dev)
        pos = torch.tensor(positions, dtype=torch.long, device=dev)
        if not logit_rows:
            self.model(input_ids, pos, self.kv_caches, meta, torch.empty(0, dtype=torch.long, device=dev))
            return None
        logits = self.model(input_ids, pos, self.kv_caches, meta, torch.tensor(logit_rows, device=dev))
        return sample(logits, [c.seq for c in chunks if c.samples])
