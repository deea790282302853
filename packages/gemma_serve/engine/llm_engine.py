"""`LLMEngine`: schedule, run, post-process, repeat. Synchronous; `AsyncEngine` drives it from a thread.

Overlapped steps: when a step is a graphed decode step, or an eager prefill / mixed step without
image tokens (`ModelRunner.can_overlap`), it is launched before the previous step's draws are read.
Its inputs that the previous step sampled are taken on the device, and each sequence holds a
PENDING_TOKEN for its not-yet-read token. The host then reads and post-processes the previous step
(stop checks, deltas, block hashes) while the GPU computes this one, so the host's work per step no
longer adds to the GPU's. A sequence that stops on a token that was still pending has computed one
token too many: it is dropped, never emitted. Any other step (sampling that reads earlier tokens,
image tokens) first reads the step in flight and runs synchronously.
"""

from __future__ import annotations

import itertools
import logging
from dataclasses import dataclass

import torch

from gemma_serve.engine.block_manager import BlockManager
from gemma_serve.engine.config import EngineConfig
from gemma_serve.engine.model_runner import ModelRunner, PendingStep
from gemma_serve.engine.multimodal import ImageInput, ImageSpan, image_spans
from gemma_serve.engine.outputs import EngineStats, RequestOutput, RequestRejectedError
from gemma_serve.engine.sampler import SampleResult
from gemma_serve.engine.sampling_params import SamplingParams
from gemma_serve.engine.scheduler import ScheduledChunk, Scheduler
from gemma_serve.engine.sequence import PENDING_TOKEN, Sequence, SequenceStatus

logger = logging.getLogger(__name__)


@dataclass
class _InFlight:
    """A launched step: its chunks, the sequences it samples for (in draw order), its draws."""

    chunks: list[ScheduledChunk]
    sampling: list[Sequence]
    pending: PendingStep


class LLMEngine:
    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        self.runner = ModelRunner(config)
        layout = self.runner.kv_layout
        self.block_manager = BlockManager(layout.num_blocks, config.block_size, config.enable_prefix_caching,
                                          layout.window, layout.num_window_blocks)
        self.scheduler = Scheduler(self.block_manager, config.max_num_seqs, config.max_num_batched_tokens,
                                   self.runner.max_model_len, config.max_queue_len)
        self.sequences: dict[str, Sequence] = {}
        self._arrivals = itertools.count()
        self._in_flight: _InFlight | None = None
        # Rows of prompts (or of recomputed context) the latest `step` scheduled, 0 for decode-only
        # steps: lets a benchmark split its time between the two kinds of step.
        self.last_step_prefill_rows = 0
        self.last_step_num_seqs = 0

    @property
    def max_model_len(self) -> int:
        return self.runner.max_model_len

    @property
    def supports_images(self) -> bool:
        return self.runner.vision is not None

    @property
    def mm_tokens_per_image(self) -> int | None:
        return self.runner.mm.mm_tokens_per_image if self.runner.mm else None

    @property
    def image_token_id(self) -> int | None:
        return self.runner.mm.image_token_id if self.runner.mm else None

    @property
    def boi_token_id(self) -> int | None:
        return self.runner.mm.boi_token_id if self.runner.mm else None

    @property
    def eoi_token_id(self) -> int | None:
        return self.runner.mm.eoi_token_id if self.runner.mm else None

    def check_request(self, prompt_token_ids: list[int], params: SamplingParams,
                      images: list[ImageInput] | None = None) -> None:
        """Raise RequestRejectedError (a ValueError) for what this engine can never serve, images
        included (see `multimodal.image_spans`), EngineOverloadedError when the waiting queue is full."""
        self._image_spans(prompt_token_ids, params, images)

    def _image_spans(self, prompt_token_ids: list[int], params: SamplingParams,
                     images: list[ImageInput] | None) -> list[ImageSpan]:
        self.scheduler.check(len(prompt_token_ids), params.max_tokens)
        vocab = self.runner.model_config.vocab_size
        if prompt_token_ids and not 0 <= min(prompt_token_ids) <= max(prompt_token_ids) < vocab:
            raise RequestRejectedError(f"prompt token ids must be in [0, {vocab})")
        return image_spans(prompt_token_ids, images, self.runner.mm, self.scheduler.max_num_batched_tokens)

    def add_request(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
                    images: list[ImageInput] | None = None) -> None:
        """Queue a request. `images`: one per image-token run of the prompt, in order."""
        if request_id in self.sequences:
            raise ValueError(f"request id {request_id!r} is already in use")
        spans = self._image_spans(prompt_token_ids, params, images)
        seq = Sequence(request_id, prompt_token_ids, params, next(self._arrivals), spans)
        if params.seed is not None:
            seq.generator = torch.Generator(device=self.runner.device)
            seq.generator.manual_seed(params.seed)
        self.sequences[request_id] = seq
        self.scheduler.add(seq)

    def abort(self, request_id: str) -> bool:
        """Free everything the request holds. Returns False if it was not (or no longer) known."""
        seq = self.sequences.pop(request_id, None)
        if seq is None:
            return False
        self.scheduler.finish(seq, "abort")
        return True

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished() or self._in_flight is not None

    def step(self) -> list[RequestOutput]:
        """One iteration: schedule, run the model, post-process. Returns the deltas ready after it:
        an overlapped step returns those of the step before it (see the module docstring)."""
        chunks = self.scheduler.schedule()
        self.last_step_prefill_rows = sum(c.num_tokens for c in chunks if c.num_tokens > 1 or not c.samples)
        self.last_step_num_seqs = len(chunks)
        previous, self._in_flight = self._in_flight, None
        if chunks and self.config.overlap_steps and self.runner.can_overlap(chunks):
            sampling = [c.seq for c in chunks if c.samples]
            pending = self.runner.launch(chunks, previous.pending if previous else None)
            for chunk in chunks:
                chunk.seq.num_computed_tokens = chunk.start + chunk.num_tokens
                if not chunk.seq.num_pending:
                    # Its tokens are all known: publish its full blocks now, so that a prompt
                    # scheduled next can share them (their KV is written by this step, which the
                    # GPU runs before any later one).
                    self.block_manager.register_computed(chunk.seq)
            for seq in sampling:
                seq.token_ids.append(PENDING_TOKEN)
                seq.num_pending += 1
            self._in_flight = _InFlight(chunks, sampling, pending)
            return self._finish(previous) if previous else []
        outputs = self._finish(previous) if previous else []
        return outputs + self.run_step(chunks)

    def run_step(self, chunks: list[ScheduledChunk]) -> list[RequestOutput]:
        """Run scheduled chunks synchronously (nothing in flight) and post-process them."""
        # The step that was in flight may have finished sequences these chunks were scheduled for.
        chunks = [c for c in chunks if c.seq.status == SequenceStatus.RUNNING]
        if not chunks:
            return []
        sampling = [c.seq for c in chunks if c.samples]
        result = self.runner.run(chunks)
        for chunk in chunks:
            chunk.seq.num_computed_tokens = chunk.start + chunk.num_tokens
        return self._postprocess(chunks, sampling, result)

    def _finish(self, flight: _InFlight) -> list[RequestOutput]:
        """Read a launched step's draws and post-process it."""
        return self._postprocess(flight.chunks, flight.sampling, flight.pending.result(), pending=True)

    def _postprocess(self, chunks: list[ScheduledChunk], sampling: list[Sequence], result: SampleResult | None,
                     pending: bool = False) -> list[RequestOutput]:
        """Record each sampled token (in place of its PENDING_TOKEN when `pending`), publish the
        blocks that became full, apply stop conditions, build the deltas."""
        outputs = []
        logprobs = result.logprobs if result and result.logprobs else itertools.repeat(None)
        for seq, token, logprob in zip(sampling, result.token_ids if result else [], logprobs):
            if seq.is_finished:
                continue  # aborted, or stopped on an earlier token, while this one was computed
            if pending:
                seq.token_ids[len(seq.token_ids) - seq.num_pending] = token
                seq.num_pending -= 1
            else:
                seq.token_ids.append(token)
            if seq.params.logprobs:
                seq.output_logprobs.append(logprob)
        for chunk in chunks:
            if not chunk.seq.is_finished:
                self.block_manager.register_computed(chunk.seq)
        for seq in sampling:
            if seq.is_finished:
                continue
            reason = self._stop_reason(seq)
            if reason is not None:
                seq.drop_pending()
                self.scheduler.finish(seq, reason)
                self.sequences.pop(seq.request_id, None)
            outputs.append(self._delta(seq))
        return outputs

    def _stop_reason(self, seq: Sequence) -> str | None:
        """Checked on the known tokens (a pending one is checked when it is read); indexes rather
        than slices, since this runs for every sequence every step."""
        p = seq.params
        ids = seq.token_ids
        end = len(ids) - seq.num_pending
        produced = end - seq.num_prompt_tokens
        if produced >= p.min_tokens:
            if ids[end - 1] in p.stop_token_ids:
                return "stop"
            for stop in p.stop_token_sequences:
                if produced >= len(stop) and tuple(ids[end - len(stop):end]) == tuple(stop):
                    return "stop"
        if produced >= p.max_tokens or end >= self.max_model_len:
            return "length"
        return None

    def _delta(self, seq: Sequence) -> RequestOutput:
        produced = seq.num_output_tokens - seq.num_pending
        first = seq.num_prompt_tokens + seq.num_emitted
        new = seq.token_ids[first:seq.num_prompt_tokens + produced]
        logprobs = seq.output_logprobs[seq.num_emitted:produced] if seq.params.logprobs else None
        seq.num_emitted = produced
        return RequestOutput(seq.request_id, new, seq.is_finished, seq.finish_reason, seq.num_prompt_tokens,
                             produced, logprobs)

    def stats(self) -> EngineStats:
        return EngineStats(num_running=len(self.scheduler.running), num_waiting=len(self.scheduler.waiting),
                           num_free_blocks=self.block_manager.num_free_blocks,
                           num_total_blocks=self.block_manager.num_blocks,
                           extra={"num_preemptions": self.scheduler.num_preemptions,
                                  "num_images_encoded": self.runner.vision.num_encoded if self.runner.vision else 0,
                                  "image_feature_cache_hits": self.runner.feature_cache.hits,
                                  "num_free_window_blocks": self.block_manager.num_free_window_blocks})

    def generate(self, prompts: list[list[int]], params: SamplingParams | list[SamplingParams],
                 images: list[list[ImageInput] | None] | None = None) -> list[list[int]]:
        """Run prompts to completion (tests, benchmarks). Returns each prompt's output token ids."""
        params_list = params if isinstance(params, list) else [params] * len(prompts)
        images_list = images if images is not None else [None] * len(prompts)
        ids = [f"generate-{next(self._arrivals)}" for _ in prompts]
        outputs: dict[str, list[int]] = {i: [] for i in ids}
        for rid, prompt, p, imgs in zip(ids, prompts, params_list, images_list):
            self.add_request(rid, prompt, p, imgs)
        while self.has_unfinished():
            for out in self.step():
                outputs[out.request_id].extend(out.new_token_ids)
        return [outputs[i] for i in ids]
