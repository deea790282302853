"""The portable engine as a decoupled Triton Python-backend model.

Runs inside Triton's Python backend stub process (the model repository's `model.py` delegates to
`EngineModel` here). It speaks the same tensor contract as TensorRT-LLM's `tensorrt_llm`
model: token ids in, streamed token ids out. Errors are sent on the request's stream with a tag
(`[invalid_request]`, `[overloaded]`, `[internal]`) that `TritonClient` turns into typed exceptions.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import threading
import uuid

from gemma_serve.engine.config import EngineConfig
from gemma_serve.engine.outputs import EngineOverloadedError, RequestRejectedError
from gemma_serve.engine.sampling_params import SamplingParams
from gemma_serve.triton import contract
from gemma_serve.triton.contract import GenerationRequest, TokenChunk

logger = logging.getLogger("gemma_serve.engine_model")

# How often a request that is waiting for its next token checks whether its caller cancelled it.
CANCEL_POLL_S = 0.1
METRICS_INTERVAL_S = 0.25


def sampling_params(request: GenerationRequest) -> SamplingParams:
    """Contract request -> engine sampling parameters."""
    stop_ids = [request.end_id] if request.end_id >= 0 else []
    stop_seqs = []
    for seq in request.stop_sequences:
        (stop_ids if len(seq) == 1 else stop_seqs).append(seq[0] if len(seq) == 1 else tuple(seq))
    return SamplingParams(
        max_tokens=request.max_tokens,
        min_tokens=request.min_tokens,
        temperature=request.temperature,
        top_k=request.top_k,
        top_p=request.top_p,
        repetition_penalty=request.repetition_penalty,
        presence_penalty=request.presence_penalty,
        frequency_penalty=request.frequency_penalty,
        seed=request.seed,
        stop_token_ids=tuple(dict.fromkeys(stop_ids)),
        stop_token_sequences=tuple(stop_seqs),
        bad_token_sequences=tuple(tuple(s) for s in request.bad_sequences),
        logprobs=request.logprobs,
    )


def engine_images(request: GenerationRequest) -> list | None:
    """Contract images -> the engine's ImageInputs (pixels and the content hash its caches key on)."""
    if not request.num_images:
        return None
    from gemma_serve.engine.multimodal import ImageInput

    return [ImageInput(pixel_values=request.pixel_values[i], content_hash=h)
            for i, h in enumerate(request.image_hashes)]


class EngineModel:
    """Triton calls initialize() once, execute() for each batch of new requests, finalize() at unload
    (through the thin `model.py` of the model repository)."""

    def initialize(self, args: dict) -> None:
        import triton_python_backend_utils as pb_utils

        from gemma_serve.engine.async_engine import AsyncEngine

        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        self.pb = pb_utils
        model_config = json.loads(args["model_config"])
        if not pb_utils.using_decoupled_model_transaction_policy(model_config):
            raise pb_utils.TritonModelException("the portable engine model must be decoupled (streaming)")
        raw = model_config["parameters"]["engine_config"]["string_value"]
        config = EngineConfig(**json.loads(raw))
        config.hf_token = os.environ.get("HF_TOKEN") or None
        logger.info("starting the portable engine for %s on %s", config.model, config.device)
        self.engine = AsyncEngine.from_config(config)
        self.engine.start()
        self._tasks: set[asyncio.Task] = set()
        self._init_metrics()

    def _init_metrics(self) -> None:
        pb = self.pb
        gauge = pb.MetricFamily.GAUGE
        counter = pb.MetricFamily.COUNTER
        labels = {"model": "gemma_portable"}
        # Families must outlive their metrics (Triton refuses updates to a metric whose family is gone).
        self._families = {
            "num_running": pb.MetricFamily("gemma_engine_running_requests", "Requests being decoded", gauge),
            "num_waiting": pb.MetricFamily("gemma_engine_waiting_requests", "Requests waiting for a slot", gauge),
            "num_free_blocks": pb.MetricFamily("gemma_engine_kv_blocks_free", "Free KV-cache blocks", gauge),
            "num_total_blocks": pb.MetricFamily("gemma_engine_kv_blocks_total", "KV-cache blocks", gauge),
            "finished": pb.MetricFamily("gemma_engine_requests_finished_total", "Finished requests", counter),
            "tokens": pb.MetricFamily("gemma_engine_generated_tokens_total", "Generated tokens", counter),
        }
        metrics = {name: family.Metric(labels) for name, family in self._families.items()}
        self._finished = metrics.pop("finished")
        self._tokens = metrics.pop("tokens")
        self._gauges = metrics
        self._stop_metrics = threading.Event()
        self._metrics_thread = threading.Thread(target=self._publish_metrics, name="engine-metrics", daemon=True)
        self._metrics_thread.start()

    def _publish_metrics(self) -> None:
        while not self._stop_metrics.wait(METRICS_INTERVAL_S):
            try:
                stats = self.engine.stats()
                for name, metric in self._gauges.items():
                    metric.set(float(getattr(stats, name)))
            except Exception:  # metrics must never take the model down
                logger.exception("publishing engine metrics failed")

    async def execute(self, requests: list) -> None:
        # Decoupled: responses go through each request's sender, so execute returns nothing.
        await asyncio.gather(*(self._serve(request) for request in requests))
        return None

    def _error(self, sender, kind: str, message: str) -> None:
        error = self.pb.TritonError(f"[{kind}] {message}")
        sender.send(self.pb.InferenceResponse(output_tensors=[], error=error),
                    flags=self.pb.TRITONSERVER_RESPONSE_COMPLETE_FINAL)

    def _tensor(self, name: str, array):
        # Through DLPack, not pb_utils.Tensor(name, ndarray): with numpy 2 in the stub (the GPU image)
        # the numpy path delivers responses whose tensors have a shape and no data.
        import torch

        return self.pb.Tensor.from_dlpack(name, torch.from_numpy(array))

    def _send(self, sender, chunk: TokenChunk, final: bool = False) -> None:
        tensors = [self._tensor(name, array) for name, array in contract.chunk_to_tensors(chunk).items()]
        flags = self.pb.TRITONSERVER_RESPONSE_COMPLETE_FINAL if final else 0
        sender.send(self.pb.InferenceResponse(output_tensors=tensors), flags=flags)

    async def _serve(self, request) -> None:
        """One request, start to end. After the final response the sender is gone: Triton frees it,
        and touching it again (even `is_cancelled()`) crashes the server, so every path sends exactly
        one final response and then leaves the sender alone."""
        sender = request.get_response_sender()
        engine_id = f"{request.request_id() or 'req'}-{uuid.uuid4().hex[:12]}"
        try:
            tensors = {t.name(): t.as_numpy() for t in request.inputs()}
            gen = contract.from_tensors(tensors)
            params = sampling_params(gen)
            stream = self.engine.add_request(engine_id, gen.input_ids, params, images=engine_images(gen))
        except (RequestRejectedError, ValueError) as exc:
            self._error(sender, "invalid_request", str(exc))
            return
        except EngineOverloadedError as exc:
            self._error(sender, "overloaded", str(exc))
            return
        except Exception as exc:
            logger.exception("request %s failed before it started", engine_id)
            self._error(sender, "internal", f"{type(exc).__name__}: {exc}")
            return

        prompt_len = len(gen.input_ids)
        pending_ids: list[int] = []
        pending_logprobs: list[float] = []
        iterator = stream.__aiter__()
        next_output: asyncio.Future | None = None
        final_sent = False
        try:
            while True:
                if next_output is None:
                    next_output = asyncio.ensure_future(iterator.__anext__())
                # Wait without cancelling the pending step, so a queued request notices its caller
                # leaving even before it produces a token.
                done, _ = await asyncio.wait({next_output}, timeout=CANCEL_POLL_S)
                if sender.is_cancelled():
                    logger.info("request %s cancelled by its caller", engine_id)
                    return
                if not done:
                    continue
                try:
                    output = next_output.result()
                except StopAsyncIteration:
                    next_output = None
                    break
                next_output = None
                # Steps that piled up while this loop was busy go out as one response: one IPC message
                # to tritonserver instead of one per token (see RequestStream.take_ready). `output`
                # ends as the latest delta.
                for output in [output, *iterator.take_ready()]:
                    pending_ids.extend(output.new_token_ids)
                    if gen.logprobs and output.new_logprobs is not None:
                        pending_logprobs.extend(output.new_logprobs)
                    self._tokens.increment(len(output.new_token_ids))
                if gen.streaming or output.finished:
                    chunk = TokenChunk(pending_ids, prompt_len + output.num_output_tokens,
                                       pending_logprobs if gen.logprobs else None)
                    final_sent = output.finished
                    self._send(sender, chunk, final=output.finished)
                    pending_ids, pending_logprobs = [], []
                if output.finished:
                    self._finished.increment(1)
                    return
            final_sent = True
            self._error(sender, "internal", "the engine ended the request early")
        except RequestRejectedError as exc:
            final_sent = True
            self._error(sender, "invalid_request", str(exc))
        except Exception as exc:
            logger.exception("request %s failed", engine_id)
            if not final_sent:
                final_sent = True
                self._error(sender, "internal", f"{type(exc).__name__}: {exc}")
        finally:
            if next_output is not None and not next_output.done():
                next_output.cancel()
            # Leaving early (cancel, error) aborts the engine request and frees its KV blocks.
            close = getattr(iterator, "aclose", None)
            if close is not None:
                await close()
            self.engine.abort(engine_id)
            if not final_sent:  # cancelled: close the stream on Triton's side
                try:
                    sender.send(flags=self.pb.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
                except Exception:
                    pass

    def finalize(self) -> None:
        self._stop_metrics.set()
        self.engine.shutdown()

