"""`ModelRunner`: owns the device. Loads the model, allocates the KV cache, turns a scheduled step
into batch tensors, runs the model and samples. For Gemma 3 with a vision tower it also encodes the
step's images (before the text forward, all new images of the step in one batch) and keeps their
features in a small cache, so an image seen again is not encoded again."""

from __future__ import annotations

import logging
import os
import time
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from gemma_serve.engine.attention import (AttentionMetadata, decode_kernel_available, decode_node_len,
                                          use_prefill_kernel)
from gemma_serve.engine.compile_log import CompileLog
from gemma_serve.engine.config import EngineConfig
from gemma_serve.engine.loader import load_vision_weights, load_weights, resolve_checkpoint
from gemma_serve.engine.model_config import ModelConfig
from gemma_serve.engine.models.gemma import GemmaModel
from gemma_serve.engine.models.vision import VisionEncoder
from gemma_serve.engine.multimodal import FeatureCache, ImageInput, MultimodalConfig
from gemma_serve.engine.quantization import check_quantization, quantize_model
from gemma_serve.engine.sampler import SampledTokens, SampleResult, needs_history, sample, sample_on_device
from gemma_serve.engine.scheduler import ScheduledChunk
from gemma_serve.engine.sequence import PENDING_TOKEN, Sequence

logger = logging.getLogger(__name__)

# Context window when neither the config nor the model sets a smaller one.
DEFAULT_MAX_MODEL_LEN = 8192
# Most images through the vision tower in one forward (bounds its activations: the real tower reads
# 4096 patches per image).
VISION_BATCH = 16
_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
           "float16": torch.float16, "fp16": torch.float16}


@torch.no_grad()
def init_random_weights(model: torch.nn.Module, seed: int = 0) -> None:
    """Random weights with the real shapes: N(0, 0.02) matrices, zero norm weights (Gemma scales by
    1 + weight). For benchmarks only: the text is noise, the work per token is the real model's."""
    generator = torch.Generator(device=next(model.parameters()).device).manual_seed(seed)
    for name, param in model.named_parameters():
        if "norm" in name:
            param.zero_()
        else:
            param.normal_(0.0, 0.02, generator=generator)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device 'cuda' was asked for, but no CUDA GPU is available")
    return device


def resolve_dtype(name: str, device: torch.device, checkpoint_dtype: str | None = None) -> torch.dtype:
    """"auto": float32 on CPU; on CUDA the checkpoint's dtype when it is bf16 or fp32, else bf16
    (Gemma's activations overflow float16)."""
    if name == "auto":
        if device.type != "cuda":
            return torch.float32
        return torch.float32 if checkpoint_dtype in ("float32", "fp32") else torch.bfloat16
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


@dataclass(frozen=True)
class KVLayout:
    """How the KV cache is split: `num_blocks` blocks for the full-attention layers (every layer
    when `window` is None) and, with a window, `num_window_blocks` for the sliding-window layers."""

    num_blocks: int
    window: int | None = None
    num_window_blocks: int = 0


def plan_kv_cache(cfg: ModelConfig, config: EngineConfig, max_model_len: int, dtype: torch.dtype,
                  free_bytes: int | None) -> KVLayout:
    """Blocks per pool. The window pool gets what the running sequences can use (each about
    `window` tokens, plus one step's new tokens), but never more blocks than a single pool for every
    layer would have; the full-attention pool gets the rest. So neither pool holds fewer tokens than
    the single pool would: short sequences (all inside the window) fit as many as before, long ones
    many more. `free_bytes` None: the sizes come from num_kv_blocks or cpu_kv_cache_tokens."""
    bs = config.block_size
    layer_block = 2 * bs * cfg.num_kv_heads * cfg.head_dim * torch.finfo(dtype).bits // 8
    num_sliding = sum(cfg.sliding)
    window = cfg.sliding_window
    use_window = bool(config.sliding_window_kv and num_sliding and window and window < max_model_len)
    if free_bytes is None or config.num_kv_blocks:
        blocks = config.num_kv_blocks or max(1, config.cpu_kv_cache_tokens // bs)
        if not use_window:
            return KVLayout(blocks)
        wanted = config.max_num_seqs * (-(-window // bs) + 2) + -(-config.max_num_batched_tokens // bs)
        return KVLayout(blocks, window, min(blocks, wanted))
    budget = int(free_bytes * config.kv_cache_memory_fraction)
    single_pool = max(1, budget // (cfg.num_layers * layer_block))
    if not use_window:
        return KVLayout(single_pool)
    wanted = config.max_num_seqs * (-(-window // bs) + 2) + -(-config.max_num_batched_tokens // bs)
    window_blocks = min(wanted, single_pool)
    rest = budget - window_blocks * num_sliding * layer_block
    return KVLayout(max(1, rest // ((cfg.num_layers - num_sliding) * layer_block)), window, window_blocks)


@dataclass
class StepInputs:
    """The flattened batch of one step, on the device."""

    input_ids: torch.Tensor  # [T]
    positions: torch.Tensor  # [T]
    meta: AttentionMetadata
    logits_indices: torch.Tensor  # [S] flat row of each sampling chunk's last token, in chunk order
    sampling_seqs: list[Sequence]
    # Image soft tokens of the step: their flat rows [R], and per image piece (image, first token,
    # end token) in row order, whose features replace those rows' embeddings.
    image_rows: torch.Tensor | None = None
    image_pieces: list[tuple[ImageInput, int, int]] | None = None


# Eager (prefill and mixed) steps overlap the step before them, as graphed decode steps do
# (GEMMA_OVERLAP_EAGER=0: they read the previous step's draws first and run synchronously).
OVERLAP_EAGER = os.environ.get("GEMMA_OVERLAP_EAGER", "1") == "1"


class PendingStep:
    """A launched step whose draws the host has not read: the device tensor feeds the next step's
    inputs, a copy to pinned host memory (CUDA) is read by `result` once the GPU reaches it."""

    def __init__(self, seqs: list[Sequence], sampled: SampledTokens | None,
                 host: tuple[torch.Tensor, torch.Tensor] | None) -> None:
        self.seqs = seqs
        self.sampled = sampled
        self.event = None
        self._host = None
        if sampled is not None and host is not None:
            n = len(seqs)
            ids, logprobs = host[0][:n], host[1][:n]
            ids.copy_(sampled.token_ids, non_blocking=True)
            if sampled.logprobs is not None:
                logprobs.copy_(sampled.logprobs, non_blocking=True)
            self._host = SampledTokens(ids, logprobs if sampled.logprobs is not None else None)
            self.event = torch.cuda.Event()
            self.event.record()

    @property
    def tokens(self) -> torch.Tensor | None:
        return self.sampled.token_ids if self.sampled is not None else None

    def result(self) -> SampleResult | None:
        """Wait for the step's draws (only for them: later work stays queued) and return them."""
        if self.sampled is None:
            return None
        if self.event is not None:
            self.event.synchronize()
            return self._host.to_host()
        return self.sampled.to_host()


class ModelRunner:
    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        self.device = resolve_device(config.device)
        folder = resolve_checkpoint(config.model, config.hf_token, config.revision)
        self.model_config = ModelConfig.from_folder(folder)
        cfg = self.model_config
        self.dtype = resolve_dtype(config.dtype, self.device, cfg.torch_dtype)
        check_quantization(config.quantization, self.device)
        self.max_model_len = config.max_model_len or min(cfg.max_position_embeddings, DEFAULT_MAX_MODEL_LEN)
        if self.max_model_len > cfg.max_position_embeddings:
            raise ValueError(f"max_model_len {self.max_model_len} exceeds the model's max_position_embeddings "
                             f"{cfg.max_position_embeddings}")
        start = time.monotonic()
        # Built on "meta" and then given uninitialised storage: every weight comes from the checkpoint,
        # so random initialisation (minutes for billions of parameters on CPU) would be wasted.
        with torch.device("meta"), _default_dtype(self.dtype):
            model = GemmaModel(cfg, self.max_model_len)
        self.model = model.to_empty(device=self.device)
        self.model.init_non_weights()
        if config.float32_residual and self.dtype in (torch.bfloat16, torch.float16):
            self.model.residual_dtype = torch.float32
        if config.load_format == "random":
            init_random_weights(self.model)
        elif config.load_format == "auto":
            load_weights(self.model, folder)
        else:
            raise ValueError(f"unknown load_format {config.load_format!r}; use auto or random")
        # From the loaded (or random) float weights; the KV cache below gets the memory this frees.
        quantize_model(self.model, config.quantization, lm_head=config.quantize_lm_head)
        # GEMMA_FLOAT32_MATMUL_OUTPUTS=0 keeps them 16-bit under the float32 residual, for comparison.
        if self.model.residual_dtype == torch.float32 and os.environ.get("GEMMA_FLOAT32_MATMUL_OUTPUTS", "1") == "1":
            self.model.set_matmul_out_dtype(torch.float32)
        self.model.eval()
        self.mm = MultimodalConfig.from_folder(folder)
        self.vision: VisionEncoder | None = None
        if self.mm is not None:
            self.vision = self._load_vision(folder)
        self.feature_cache = FeatureCache(config.image_feature_cache_entries, config.image_feature_cache_bytes)
        logger.info("loaded %s (Gemma %d, %d layers) on %s in %s in %.1f s", folder, cfg.generation, cfg.num_layers,
                    self.device, self.dtype, time.monotonic() - start)
        self.block_size = config.block_size
        free = torch.cuda.mem_get_info(self.device)[0] if self.device.type == "cuda" else None
        self.kv_layout = plan_kv_cache(cfg, config, self.max_model_len, self.dtype, free)
        self.num_blocks = self.kv_layout.num_blocks
        self.num_window_blocks = self.kv_layout.num_window_blocks
        self.decode_node_len = decode_node_len(self.max_model_len)
        use_graphs = config.cuda_graphs and self.device.type == "cuda"
        if use_graphs and not decode_kernel_available():
            logger.warning("CUDA graphs need Triton's paged decode kernel, and Triton is not installed: eager steps")
            use_graphs = False
        # With CUDA graphs, one block more per pool than the block manager knows of: the scratch
        # block that the padding rows of a graphed batch write to (the last one).
        windowed = [self.kv_layout.window is not None and s for s in cfg.sliding]
        self.kv_caches = []
        for in_window in windowed:
            blocks = self.num_window_blocks if in_window else self.num_blocks
            shape = (blocks + int(use_graphs), self.block_size, cfg.num_kv_heads, cfg.head_dim)
            self.kv_caches.append((torch.zeros(shape, dtype=self.dtype, device=self.device),
                                   torch.zeros(shape, dtype=self.dtype, device=self.device)))
        tokens = self.num_blocks * self.block_size
        logger.info("KV cache: %d blocks of %d tokens = %d tokens (%.1f sequences of max_model_len %d)%s",
                    self.num_blocks, self.block_size, tokens, tokens / self.max_model_len, self.max_model_len,
                    f" for the {cfg.num_layers - sum(windowed)} full-attention layers; the {sum(windowed)} "
                    f"sliding-window layers keep their {self.kv_layout.window}-token window in "
                    f"{self.num_window_blocks} blocks" if self.kv_layout.window else "")
        # Two pinned buffers for the draws of overlapped steps: one being read, one being written.
        self._draw_buffers = []
        if self.device.type == "cuda":
            self._draw_buffers = [(torch.empty(config.max_num_seqs, dtype=torch.long, pin_memory=True),
                                   torch.empty(config.max_num_seqs, dtype=torch.float32, pin_memory=True))
                                  for _ in range(2)]
        self._launches = 0
        self.graphs = None
        self.prefill_graphs = None
        if use_graphs:
            from gemma_serve.engine.cuda_graphs import DecodeGraphs, PrefillGraphs, prefill_graph_lengths

            self.graphs = DecodeGraphs(self, scratch_block=self.num_blocks, window_scratch_block=self.num_window_blocks)
            self.graphs.capture()
            # The prefill graphs need the Triton prefill kernel (it reads the prompt's extent from
            # the device; the PyTorch path loops over host lengths).
            if (config.prefill_cuda_graphs and use_prefill_kernel(self.device)
                    and prefill_graph_lengths(config.max_num_batched_tokens, self.max_model_len)):
                self.prefill_graphs = PrefillGraphs(self, self.num_blocks, self.num_window_blocks, self.graphs.pool)
                self.prefill_graphs.capture()
        if self.device.type == "cuda":
            self._warm_up()

    def warm_up_sizes(self) -> list[int]:
        """Rows of the warm-up's eager steps: one per class of row count the kernels pick their tiles
        by (the INT8 matmul's 1-4 / 16 / 32 / 64 / more rows, cuBLAS's heuristics), up to a full
        token budget, so that a step of W2's size does not compile in the middle of serving."""
        budget = self.config.max_num_batched_tokens
        return sorted({min(n, budget) for n in (4, 16, 32, 64, 256, budget)})

    @torch.inference_mode()
    def _warm_up(self) -> None:
        """Eager steps before serving (a decode row and prompt chunks, `warm_up_sizes` rows in all),
        so that Triton compiles the eager path's kernels now rather than during the first requests.
        They write the graphs' scratch block, or block 0: nothing is allocated yet, and a block is
        always written before it is read."""
        start = time.monotonic()
        with CompileLog() as log:
            for rows in self.warm_up_sizes():
                self._dummy_eager_step(rows)
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
        logger.info("warmed up the eager (prefill and mixed) path, steps of %s rows, in %.1f s (%s)",
                    "/".join(map(str, self.warm_up_sizes())), time.monotonic() - start, log.summary())

    def _dummy_eager_step(self, rows: int) -> None:
        """One eager forward of `rows` rows: a decode row, then prompt chunks of at most 512 rows
        (and within max_model_len), every row's slot in the scratch block."""
        dev, bs = self.device, self.block_size
        longest = max(1, min(512, self.max_model_len - 1))
        lens = [1]  # the decode row
        left = rows - 1
        while left > 0:
            lens.append(min(left, longest))
            left -= lens[-1]
        width = -(-max(lens) // bs)

        def tensor(values: list[int]) -> torch.Tensor:
            return torch.tensor(values, dtype=torch.long, device=dev)

        def tables_and_slots(scratch: int) -> tuple[torch.Tensor, torch.Tensor]:
            block = scratch if self.graphs is not None else 0
            slots = [block * bs + i % bs for n in lens for i in range(n)]
            return tensor([[block] * width for _ in lens]), tensor(slots)

        tables, slots = tables_and_slots(self.num_blocks)
        window_tables, window_slots = (tables_and_slots(self.num_window_blocks) if self.kv_layout.window
                                       else (None, None))
        starts = [0]
        for n in lens:
            starts.append(starts[-1] + n)
        positions = [i for n in lens for i in range(n)]
        meta = AttentionMetadata(
            slot_mapping=slots, block_tables=tables, context_lens=tensor(lens), query_start=tensor(starts),
            num_decodes=1, max_decode_context_len=1, query_start_host=starts, context_lens_host=lens,
            decode_node_len=self.decode_node_len, window_block_tables=window_tables, window_slot_mapping=window_slots)
        self.model(tensor([0] * rows), tensor(positions), self.kv_caches, meta, tensor([s - 1 for s in starts[1:]]))

    def _load_vision(self, folder) -> VisionEncoder:
        with torch.device("meta"), _default_dtype(self.dtype):
            vision = VisionEncoder(self.mm, self.model_config.hidden_size)
        vision = vision.to_empty(device=self.device)
        vision.init_non_weights()
        if self.config.load_format == "random":
            vision.init_random_weights()
        else:
            load_vision_weights(vision, folder)
        return vision.eval()

    def prepare(self, chunks: list[ScheduledChunk], previous_tokens: torch.Tensor | None = None,
                previous_rows: list[int] | None = None) -> StepInputs:
        """Flatten the step: decodes first (one token each), then prefill chunks, as the attention
        metadata requires. Sampled rows are listed in the chunks' own order. `previous_rows[j] >= 0`:
        chunk j's (single) token is `previous_tokens[previous_rows[j]]`, a draw still on the device
        (PENDING_TOKEN on the host)."""
        order = sorted(range(len(chunks)), key=lambda j: chunks[j].num_tokens > 1)
        ids: list[int] = []
        positions: list[int] = []
        starts = [0]
        ctx_lens: list[int] = []
        last_row = [0] * len(chunks)
        image_rows: list[int] = []
        image_pieces: list[tuple[ImageInput, int, int]] = []
        image_spans: list[list[tuple[int, int]]] = []
        pending_rows: list[tuple[int, int]] = []  # (flat row, row of previous_tokens)
        for j in order:
            chunk = chunks[j]
            end = chunk.start + chunk.num_tokens
            spans = chunk.seq.spans_in(chunk.start, end) if chunk.seq.image_spans else []
            for span in spans:
                a, b = max(span.start, chunk.start), min(span.end, end)
                image_pieces.append((span.image, a - span.start, b - span.start))
                image_rows.extend(range(len(ids) + a - chunk.start, len(ids) + b - chunk.start))
            image_spans.append([(span.start, span.end) for span in spans])
            ids.extend(chunk.seq.token_ids[chunk.start:end])
            if previous_rows is not None and previous_rows[j] >= 0:
                pending_rows.append((len(ids) - 1, previous_rows[j]))
                ids[-1] = 0  # filled in on the device below
            positions.extend(range(chunk.start, end))
            starts.append(starts[-1] + chunk.num_tokens)
            ctx_lens.append(end)
            last_row[j] = starts[-1] - 1
        num_decodes = sum(1 for c in chunks if c.num_tokens == 1)
        width = max(len(chunks[j].seq.block_table) for j in order)
        tables = [chunks[j].seq.block_table + [0] * (width - len(chunks[j].seq.block_table)) for j in order]
        query_lens = torch.tensor([chunks[j].num_tokens for j in order])
        host = dict(
            input_ids=torch.tensor(ids, dtype=torch.long),
            positions=torch.tensor(positions, dtype=torch.long),
            block_tables=torch.tensor(tables, dtype=torch.long),
            context_lens=torch.tensor(ctx_lens, dtype=torch.long),
            query_start=torch.tensor(starts, dtype=torch.long),
            logits_indices=torch.tensor([last_row[j] for j, c in enumerate(chunks) if c.samples], dtype=torch.long),
        )
        if image_rows:
            host["image_rows"] = torch.tensor(image_rows, dtype=torch.long)
        # Each token's cache slot, through its sequence's block table.
        owner = torch.repeat_interleave(torch.arange(len(order)), query_lens)
        pos = host["positions"]
        host["slot_mapping"] = host["block_tables"][owner, pos // self.block_size] * self.block_size + pos % self.block_size
        if self.kv_layout.window:
            # The window pool's table (given-back entries, FREED, are never read: sent as block 0).
            rows = [[max(0, b) for b in chunks[j].seq.window_table] for j in order]
            host["window_block_tables"] = torch.tensor([r + [0] * (width - len(r)) for r in rows], dtype=torch.long)
            host["window_slot_mapping"] = (host["window_block_tables"][owner, pos // self.block_size] * self.block_size
                                           + pos % self.block_size)
        if pending_rows:
            host["pending_rows"] = torch.tensor(pending_rows, dtype=torch.long)
        dev = {k: v.to(self.device, non_blocking=True) for k, v in host.items()}
        if pending_rows:
            rows_and_sources = dev.pop("pending_rows")
            dev["input_ids"][rows_and_sources[:, 0]] = previous_tokens[rows_and_sources[:, 1]]
        meta = AttentionMetadata(
            slot_mapping=dev["slot_mapping"],
            block_tables=dev["block_tables"],
            context_lens=dev["context_lens"],
            query_start=dev["query_start"],
            num_decodes=num_decodes,
            max_decode_context_len=max(ctx_lens[:num_decodes], default=0),
            query_start_host=starts,
            context_lens_host=ctx_lens,
            decode_node_len=self.decode_node_len,
            image_spans_host=image_spans if image_rows else None,
            window_block_tables=dev.get("window_block_tables"),
            window_slot_mapping=dev.get("window_slot_mapping"),
        )
        return StepInputs(dev["input_ids"], dev["positions"], meta, dev["logits_indices"],
                          [c.seq for c in chunks if c.samples], dev.get("image_rows"), image_pieces or None)

    def embed_images(self, inputs: StepInputs) -> torch.Tensor | None:
        """The features of the step's image rows [R, hidden], in row order (None without images)."""
        if not inputs.image_pieces:
            return None
        features = self.image_features([image for image, _, _ in inputs.image_pieces])
        return torch.cat([features[image.content_hash][a:b] for image, a, b in inputs.image_pieces])

    @torch.inference_mode()
    def image_features(self, images: list[ImageInput]) -> dict[str, torch.Tensor]:
        """content hash -> [mm_tokens_per_image, hidden] features: from the cache, or encoded (the
        missing ones together, VISION_BATCH at a time) and cached."""
        if self.vision is None:
            raise RuntimeError("this model has no vision tower")
        found: dict[str, torch.Tensor] = {}
        missing: dict[str, ImageInput] = {}
        for image in images:
            digest = image.content_hash
            if digest in found or digest in missing:
                continue
            cached = self.feature_cache.get(digest)
            if cached is not None:
                found[digest] = cached
            else:
                missing[digest] = image
        todo = list(missing.items())
        for i in range(0, len(todo), VISION_BATCH):
            batch = todo[i:i + VISION_BATCH]
            pixels = torch.stack([torch.as_tensor(image.pixel_values) for _, image in batch])
            encoded = self.vision.encode(pixels.to(self.device, self.dtype, non_blocking=True))
            for (digest, _), feats in zip(batch, encoded):
                feats = feats.clone()  # its own storage: a cached view would pin the whole batch
                found[digest] = feats
                self.feature_cache.put(digest, feats)
        return found

    def can_overlap(self, chunks: list[ScheduledChunk]) -> bool:
        """The step can be launched before the previous step's draws are read: its sampling reads no
        earlier token's value, and the only inputs the previous step may still be drawing are
        single-token chunks' tokens (taken on the device). On an engine with decode graphs, a graphed
        decode step qualifies; so does an eager (prefill, mixed, or ungraphed decode) step without
        image tokens (`OVERLAP_EAGER`), whose ~20 ms of host work for 8K prompt rows then runs while
        the GPU computes the step before."""
        # Without decode graphs (CPU, or cuda_graphs off) every step runs synchronously: on a CPU,
        # where the host computes the step itself, overlapping would only delay its tokens a step.
        if self.graphs is None or any(needs_history(c.seq) for c in chunks):
            return False
        if self.graphs.can_run(chunks):
            return not any(c.seq.image_spans and c.seq.spans_in(c.start, c.start + 1) for c in chunks)
        if not OVERLAP_EAGER:
            return False
        return not any((c.seq.image_spans and c.seq.spans_in(c.start, c.start + c.num_tokens))
                       or (c.num_tokens > 1 and c.start + c.num_tokens > len(c.seq.token_ids) - c.seq.num_pending)
                       for c in chunks)

    @torch.inference_mode()
    def launch(self, chunks: list[ScheduledChunk], previous: PendingStep | None) -> PendingStep:
        """Queue a step `can_overlap` accepted without waiting for the GPU. A chunk whose input
        token is PENDING_TOKEN takes that token from `previous`'s draws on the device."""
        rows = None
        if previous is not None and previous.tokens is not None:
            where = {id(seq): i for i, seq in enumerate(previous.seqs)}
            rows = [where[id(c.seq)] if c.seq.token_ids[c.start] == PENDING_TOKEN else -1 for c in chunks]
            if max(rows) < 0:
                rows = None
        if self.graphs is not None and self.graphs.can_run(chunks):
            logits, seqs = self.graphs.run(chunks, previous.tokens if rows else None, rows)
        elif rows is None and self.prefill_graphs is not None and self.prefill_graphs.can_run(chunks):
            logits, seqs = self.prefill_graphs.run(chunks)
        else:
            inputs = self.prepare(chunks, previous.tokens if rows else None, rows)
            logits = self.model(inputs.input_ids, inputs.positions, self.kv_caches, inputs.meta,
                                inputs.logits_indices)
            seqs = inputs.sampling_seqs
        sampled = sample_on_device(logits, seqs) if seqs else None
        buffers = self._draw_buffers[self._launches % 2] if self._draw_buffers else None
        self._launches += 1
        return PendingStep(seqs, sampled, buffers)

    @torch.inference_mode()
    def run(self, chunks: list[ScheduledChunk]) -> SampleResult | None:
        """Compute the step; sample one token for every chunk that reaches its sequence's end.
        Decode-only steps replay a CUDA graph when there is one for their (padded) batch size."""
        # A one-token chunk can still be an image's last soft token (the rest came from the prefix
        # cache): the graphs embed token ids only, so such a step runs eagerly.
        if (self.graphs is not None and self.graphs.can_run(chunks)
                and not any(c.seq.image_spans and c.seq.spans_in(c.start, c.start + 1) for c in chunks)):
            logits, seqs = self.graphs.run(chunks)
        elif self.prefill_graphs is not None and self.prefill_graphs.can_run(chunks):
            logits, seqs = self.prefill_graphs.run(chunks)
        else:
            inputs = self.prepare(chunks)
            logits = self.model(inputs.input_ids, inputs.positions, self.kv_caches, inputs.meta,
                                inputs.logits_indices, self.embed_images(inputs), inputs.image_rows)
            seqs = inputs.sampling_seqs
        if not seqs:
            return None
        return sample(logits, seqs)
