"""`GemmaService`: what `model/model.py` delegates to. It starts Triton with the configured engine,
connects the client, and turns HTTP requests into pipeline runs.

Routes: `predict` (Truss), and the OpenAI routes in `openai_routes.py`, all over one pipeline.
"""

from __future__ import annotations

import asyncio
import json
import logging
import tempfile
import uuid
from pathlib import Path
from typing import Any, AsyncIterator

from pydantic import ValidationError
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse

from gemma_serve.api import errors
from gemma_serve.api.chat_prompt import ChatPrompt, ChatPromptBuilder, ImageSupport
from gemma_serve.api.openai_routes import OpenAIRoutes
from gemma_serve.api.openai_schemas import ChatCompletionRequest, CompletionRequest
from gemma_serve.api.pipeline import Finished, GenerationPipeline, TextDelta
from gemma_serve.api.schemas import PredictRequest
from gemma_serve.api.tokenizer import Tokenizer
from gemma_serve.settings import ServingSettings
from gemma_serve.triton import trtllm_engine
from gemma_serve.triton.client import TritonClient
from gemma_serve.triton.repository import DEFAULT_DATA_DIR, PORTABLE_MODEL, render_portable_repository
from gemma_serve.triton.server import TritonServer
from gemma_serve.triton.trtllm_repository import TENSORRT_LLM_MODEL

logger = logging.getLogger(__name__)


async def read_json(request: Request) -> Any:
    """The body as JSON, or a 400 that says why not."""
    body = await request.body()
    if not body:
        raise errors.invalid("the request body is empty; send a JSON object")
    try:
        return json.loads(body)
    except (ValueError, UnicodeDecodeError) as exc:
        raise errors.invalid(f"the request body is not valid JSON: {exc}") from exc


def parse(model: type, payload: Any):
    if not isinstance(payload, dict):
        raise errors.invalid("the request body must be a JSON object")
    try:
        return model.model_validate(payload)
    except ValidationError as exc:
        raise errors.from_validation_error(exc) from exc


class GemmaService:
    def __init__(self, settings: ServingSettings, tokenizer: Tokenizer, server: TritonServer | None,
                 client: TritonClient, images: ImageSupport | None = None,
                 no_images_reason: str = "the model has no vision tower") -> None:
        self.settings = settings
        self.tokenizer = tokenizer
        self.server = server
        self.client = client
        self.pipeline = GenerationPipeline(tokenizer, client, settings.default_max_tokens)
        self.chat_prompt = ChatPromptBuilder(tokenizer, images, no_images_reason)
        self.openai = OpenAIRoutes(self.pipeline, settings.model_name, self.chat_prompt.build)

    @classmethod
    def start(cls, settings: ServingSettings, hf_token: str | None = None, data_dir: Path | None = None
              ) -> "GemmaService":
        """Load the tokenizer, render the model repository, start tritonserver and wait for the model."""
        if trtllm_engine.resolve_engine(settings) == "tensorrt_llm":
            if settings.backend == "inprocess":
                raise ValueError("backend 'inprocess' runs the portable engine; TensorRT-LLM runs in Triton")
            # Check and fetch the engine first (fails fast), then the tokenizer, then the slow start.
            engine = trtllm_engine.prepare(settings, hf_token)
            tokenizer = Tokenizer.load(engine.tokenizer_source, hf_token, engine.tokenizer_revision,
                                       engine.max_model_len)
            server = trtllm_engine.start_server(settings, engine, data_dir)
            logger.info("serving %s through tritonserver at %s (metrics %s)", settings.engine_repository,
                        server.grpc_url, server.metrics_url)
            return _started(cls, settings, tokenizer, server, TENSORRT_LLM_MODEL, None,
                            "the TensorRT-LLM engine serves text only (see docs/production.md)")
        tokenizer = Tokenizer.load(settings.tokenizer_path, hf_token, settings.revision, settings.max_model_len)
        images, no_images_reason = _image_support(settings, tokenizer)
        if settings.backend == "inprocess":
            # The same pipeline over the engine in this process, no Triton hop (gemma_serve/direct.py).
            from gemma_serve.direct import InProcessEngineClient

            return cls(settings, tokenizer, None, InProcessEngineClient.start(settings, hf_token), images,
                       no_images_reason)
        workdir = Path(settings.workdir) if settings.workdir else Path(tempfile.mkdtemp(prefix="gemma-serve-"))
        # Truss hands the model its data_dir (/app/data in the image); the repository's data/ otherwise.
        repository = render_portable_repository(settings, workdir / "model_repository",
                                                data_dir=Path(data_dir) if data_dir else DEFAULT_DATA_DIR)
        env = {"HF_TOKEN": hf_token or ""}
        server = TritonServer(
            repository, workdir,
            grpc_port=settings.triton_grpc_port, http_port=settings.triton_http_port,
            metrics_port=settings.triton_metrics_port, startup_timeout_s=settings.triton_startup_timeout_s,
            log_verbose=settings.triton_log_verbose, extra_env=env,
        )
        server.start()
        logger.info("serving %s through tritonserver at %s (metrics %s)", settings.model, server.grpc_url,
                    server.metrics_url)
        return _started(cls, settings, tokenizer, server, PORTABLE_MODEL, images, no_images_reason)

    def stop(self) -> None:
        if self.server is not None:
            self.server.stop()
        stop_engine = getattr(self.client, "stop", None)  # the in-process engine (backend inprocess)
        if stop_engine is not None:
            stop_engine()

    # --- routes: each parses its own body so every error gets the same JSON error body -----------

    async def predict(self, request: Request) -> Response:
        return await _answer(self._predict(request))

    async def chat_completions(self, request: Request) -> Response:
        return await _answer(self._openai(request, ChatCompletionRequest, self.openai.chat))

    async def completions(self, request: Request) -> Response:
        return await _answer(self._openai(request, CompletionRequest, self.openai.completions))

    async def _openai(self, request: Request, schema: type, route) -> Response:
        return await route(parse(schema, await read_json(request)))

    async def _predict(self, request: Request) -> Response:
        body = parse(PredictRequest, await read_json(request))
        if body.messages is not None:
            prompt = await self.chat_prompt.build(body.messages)
        else:
            prompt = ChatPrompt(self.tokenizer.encode_prompt(body.prompt))
        prepared = self.pipeline.prepare(prompt.ids, body, images=prompt.images)
        events = self.pipeline.stream(prepared, request.headers.get("x-request-id") or uuid.uuid4().hex)
        if body.stream:
            first = await _first_event(events)
            return StreamingResponse(_predict_chunks(first, events), media_type="text/plain; charset=utf-8")
        text, finished = [], None
        async for event in events:
            if isinstance(event, TextDelta):
                text.append(event.text)
            else:
                finished = event
        assert finished is not None
        return JSONResponse({"text": "".join(text), "finish_reason": finished.finish_reason,
                             "usage": finished.usage, "model": self.settings.model_name})


def _image_support(settings: ServingSettings, tokenizer: Tokenizer) -> tuple[ImageSupport | None, str]:
    """Images are taken when the checkpoint has a vision tower and the settings allow any."""
    if settings.max_images_per_request == 0:
        return None, "max_images_per_request is 0"
    if tokenizer.folder is None:
        return None, "the checkpoint folder is unknown"
    support = ImageSupport.from_checkpoint(tokenizer.folder, tokenizer, settings.image_limits)
    return support, "the model has no vision tower"


def _started(cls, settings: ServingSettings, tokenizer: Tokenizer, server: TritonServer, model_name: str,
             images: ImageSupport | None, no_images_reason: str) -> "GemmaService":
    """Wire the service to a running server; if that fails, stop the server, since Truss retries a
    failed load() and would otherwise leave one tritonserver behind per attempt."""
    try:
        return cls(settings, tokenizer, server, TritonClient(server.grpc_url, model_name), images, no_images_reason)
    except BaseException:
        server.stop()
        raise


async def _answer(handler) -> Response:
    """Run a route; any error becomes its JSON error response, and the server keeps serving."""
    try:
        return await handler
    except errors.APIError as exc:
        return exc.response()
    except Exception as exc:
        logger.exception("request failed")
        return errors.internal(f"{type(exc).__name__}: {exc}").response()


async def _first_event(events: AsyncIterator[TextDelta | Finished]) -> TextDelta | Finished:
    """Wait for the first event before answering 200, so errors the engine raises before the first
    token (rejected, overloaded) still get their status code."""
    try:
        return await events.__anext__()
    except BaseException:
        await events.aclose()
        raise


async def _predict_chunks(first: TextDelta | Finished, events: AsyncIterator[TextDelta | Finished]
                          ) -> AsyncIterator[bytes]:
    try:
        if isinstance(first, TextDelta) and first.text:
            yield first.text.encode()
        async for event in events:
            if isinstance(event, TextDelta) and event.text:
                yield event.text.encode()
    except errors.APIError as exc:
        # Headers are gone; the stream just ends. The log says why.
        logger.error("stream failed after it started: %s", exc)
    except asyncio.CancelledError:
        raise
    finally:
        await events.aclose()
