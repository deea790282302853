"""The engine without the Truss and Triton layers, behind the same API code: `serve --direct`.

This is the baseline that the benchmark's "serving overhead" is measured against:

    full stack  client -HTTP-> truss server (uvicorn, FastAPI, truss's model wrapper) -> model/model.py
                -> GemmaService [API pipeline] -gRPC stream-> tritonserver -> Python backend stub
                (triton/engine_model.py) -> AsyncEngine
    direct      client -HTTP-> uvicorn (the truss server's settings: h11, uvloop, one worker)
                -> GemmaService [the same API pipeline] -> AsyncEngine, in the same process

Both serve the same routes with the same code for everything a request needs on its way in and out
(validation, chat template, tokenization, context-window checks, streaming detokenization, stop
strings, SSE framing, usage counts) and run the same engine with the same settings: `backend` is the
only setting that differs. The ratio of the two sweeps is therefore what the Truss server and the
Triton hop add: truss's routing, model wrapper and middleware; turning requests into tensors and back;
the gRPC stream; tritonserver; and the IPC between tritonserver and the backend stub, one response
per streamed chunk. It is not the cost of HTTP, tokenization or detokenization, which both pay.
One difference runs the other way and belongs to the comparison: here the engine's thread shares one
interpreter (and its GIL) with the HTTP server, while behind Triton the engine has the backend stub's
process to itself.

`InProcessEngineClient` stands where `TritonClient` stands (`GemmaService` picks it when the setting
`backend` is `inprocess`, also under the Truss server, which then measures Truss without Triton);
`serve_direct()` serves `GemmaService` with no Truss server around it.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import uuid
from pathlib import Path
from typing import Any, AsyncIterator, Mapping

from gemma_serve.engine.outputs import EngineOverloadedError, RequestRejectedError
from gemma_serve.settings import ServingSettings
from gemma_serve.triton.client import TritonRequestError
from gemma_serve.triton.contract import GenerationRequest, TokenChunk
from gemma_serve.triton.engine_model import engine_images, sampling_params

logger = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[2]
# The truss server's graceful-shutdown wait is an hour; a benchmark baseline should stop promptly.
GRACEFUL_SHUTDOWN_S = 5


class InProcessEngineClient:
    """`TritonClient`'s interface over an `AsyncEngine` in this process: `generate()` streams
    `TokenChunk`s and raises `TritonRequestError` of the same kinds, so `GenerationPipeline` cannot tell
    the two apart. Requests become engine requests through the functions the Triton model uses
    (`sampling_params`, `engine_images`), and chunks are cut as it cuts them (one per engine delta, or
    one for the deltas that piled up while the loop was busy)."""

    def __init__(self, engine: Any) -> None:
        self.engine = engine

    @classmethod
    def start(cls, settings: ServingSettings, hf_token: str | None = None) -> InProcessEngineClient:
        """Load the model, allocate the KV cache and start the engine's thread."""
        from gemma_serve.engine.async_engine import AsyncEngine
        from gemma_serve.triton.repository import engine_config

        config = engine_config(settings)
        config.hf_token = hf_token
        logger.info("starting the portable engine in-process for %s on %s (no Triton)", config.model, config.device)
        engine = AsyncEngine.from_config(config)
        engine.start()
        return cls(engine)

    async def generate(self, request: GenerationRequest, request_id: str) -> AsyncIterator[TokenChunk]:
        engine_id = f"{request_id}-{uuid.uuid4().hex[:12]}"
        images = engine_images(request)
        try:
            stream = self.engine.add_request(engine_id, request.input_ids, sampling_params(request), images=images)
        except (RequestRejectedError, ValueError) as exc:
            raise TritonRequestError(str(exc), "invalid_request") from exc
        except EngineOverloadedError as exc:
            raise TritonRequestError(str(exc), "overloaded") from exc
        except Exception as exc:
            logger.exception("request %s failed before it started", engine_id)
            raise TritonRequestError(f"{type(exc).__name__}: {exc}", "internal") from exc
        prompt_len = len(request.input_ids)
        pending_ids: list[int] = []
        pending_logprobs: list[float] = []
        try:
            async for output in stream:
                # As the Triton model coalesces; `output` ends as the latest delta.
                for output in [output, *stream.take_ready()]:
                    pending_ids.extend(output.new_token_ids)
                    if request.logprobs and output.new_logprobs is not None:
                        pending_logprobs.extend(output.new_logprobs)
                if request.streaming or output.finished:
                    yield TokenChunk(pending_ids, prompt_len + output.num_output_tokens,
                                     pending_logprobs if request.logprobs else None)
                    pending_ids, pending_logprobs = [], []
                if output.finished:
                    return
            raise TritonRequestError("the engine ended the request early", "internal")
        except RequestRejectedError as exc:
            raise TritonRequestError(str(exc), "invalid_request") from exc
        except TritonRequestError:
            raise
        except Exception as exc:
            logger.exception("request %s failed", engine_id)
            raise TritonRequestError(f"{type(exc).__name__}: {exc}", "internal") from exc
        finally:
            # Leaving early (caller gone, stop string matched) aborts the request and frees its blocks.
            await stream.aclose()

    async def close(self) -> None:
        """Nothing to close per event loop (TritonClient closes its channel here)."""

    def stop(self) -> None:
        self.engine.shutdown()


def load_settings(environ: Mapping[str, str] | None = None, config_path: Path = REPO_ROOT / "config.yaml"
                  ) -> ServingSettings:
    """config.yaml's model_metadata and GEMMA_SERVE_* variables, as the Truss model reads them, with the
    engine in this process."""
    import yaml

    metadata = (yaml.safe_load(config_path.read_text()) or {}).get("model_metadata") or {}
    environ = dict(os.environ if environ is None else environ)
    environ["GEMMA_SERVE_BACKEND"] = "inprocess"
    return ServingSettings.load(metadata, environ)


def create_app(service: Any) -> Any:
    """The routes the Truss server gives this model, over `service` (a started GemmaService)."""
    from starlette.applications import Starlette
    from starlette.responses import JSONResponse
    from starlette.routing import Route

    async def ready(request):
        # What the truss server answers once load() is done; here the service is loaded before serving.
        return JSONResponse({"name": "model", "ready": True})

    return Starlette(routes=[
        Route("/v1/models/model", ready, methods=["GET"]),
        Route("/v1/models/model:predict", service.predict, methods=["POST"]),
        Route("/v1/chat/completions", service.chat_completions, methods=["POST"]),
        Route("/v1/completions", service.completions, methods=["POST"]),
    ])


def serve_direct(port: int, env: Mapping[str, str], host: str = "127.0.0.1") -> int:
    """Foreground: load the engine in this process, serve until SIGINT / SIGTERM, stop the engine."""
    import importlib.util

    import uvicorn

    from gemma_serve.api.service import GemmaService

    os.environ.update(env)  # the same GEMMA_SERVE_* variables `serve` hands the Truss server
    settings = load_settings()
    service = GemmaService.start(settings, os.environ.get("HF_TOKEN") or None)
    try:
        config = uvicorn.Config(
            create_app(service), host=host, port=port, workers=1,
            # As the truss server runs uvicorn (truss_server.py), so the two differ only in what serves.
            http="h11", loop="uvloop" if importlib.util.find_spec("uvloop") else "asyncio",
            timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_S, log_level="info")
        logger.info("serving %s directly (no Truss server, no Triton) on http://%s:%d", settings.model_name,
                    host, port)
        # uvicorn shuts down gracefully on SIGINT / SIGTERM, then re-raises the signal: end quietly on either.
        signal.signal(signal.SIGTERM, _interrupt)
        asyncio.run(uvicorn.Server(config).serve())
    except KeyboardInterrupt:
        pass
    finally:
        service.stop()
    return 0


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt
