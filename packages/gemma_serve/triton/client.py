"""`TritonClient`: one gRPC stream per generation request, over one shared channel.

Closing the iterator that `generate()` returns (the HTTP caller went away, or a stop string matched)
cancels the gRPC call; Triton then reports the request as cancelled to the model, which frees the
engine's slot.
"""

from __future__ import annotations

import asyncio
import logging
import re
from typing import AsyncIterator

import tritonclient.grpc.aio as grpcclient
from tritonclient.grpc import InferInput, InferRequestedOutput
from tritonclient.utils import InferenceServerException, np_to_triton_dtype

from gemma_serve.triton import contract
from gemma_serve.triton.contract import GenerationRequest, TokenChunk

logger = logging.getLogger(__name__)

# Errors cross a decoupled gRPC stream as plain text; the engine model prefixes a tag so the API
# layer can map them to HTTP statuses (see `engine_model.py`).
_TAG = re.compile(r"\[(invalid_request|overloaded|internal)\]\s*")


class TritonRequestError(RuntimeError):
    """A request failed inside Triton or the engine. `kind` says whose fault it is."""

    def __init__(self, message: str, kind: str = "internal") -> None:
        super().__init__(message)
        self.kind = kind  # "invalid_request" (4xx), "overloaded" (503), "internal" (5xx)


class TritonUnavailableError(RuntimeError):
    """Triton cannot be reached."""


def _parse_error(exc: BaseException) -> TritonRequestError:
    text = exc.message() if isinstance(exc, InferenceServerException) else str(exc)
    text = text or repr(exc)
    match = _TAG.search(text)
    if match:
        return TritonRequestError(text[match.end():].strip(), match.group(1))
    return TritonRequestError(text, "internal")


class TritonClient:
    def __init__(self, url: str, model_name: str) -> None:
        self.url = url
        self.model_name = model_name
        self._channel: grpcclient.InferenceServerClient | None = None
        self._outputs = [InferRequestedOutput(spec.name) for spec in contract.OUTPUTS]

    @property
    def _client(self) -> grpcclient.InferenceServerClient:
        # Created on first use: a gRPC aio channel belongs to the event loop that creates it, which
        # must be the serving loop, not the thread where Truss runs load().
        if self._channel is None:
            self._channel = grpcclient.InferenceServerClient(self.url)
        return self._channel

    async def is_ready(self) -> bool:
        try:
            return bool(await self._client.is_model_ready(self.model_name))
        except InferenceServerException:
            return False

    async def wait_until_ready(self, timeout_s: float = 30.0) -> None:
        deadline = asyncio.get_running_loop().time() + timeout_s
        while not await self.is_ready():
            if asyncio.get_running_loop().time() > deadline:
                raise TritonUnavailableError(f"model '{self.model_name}' not ready at {self.url} after {timeout_s} s")
            await asyncio.sleep(0.2)

    def _inputs(self, request: GenerationRequest) -> list[InferInput]:
        inputs = []
        for name, array in contract.to_tensors(request).items():
            tensor = InferInput(name, list(array.shape), np_to_triton_dtype(array.dtype))
            tensor.set_data_from_numpy(array)
            inputs.append(tensor)
        return inputs

    async def generate(self, request: GenerationRequest, request_id: str) -> AsyncIterator[TokenChunk]:
        """Stream the request's tokens. Raises TritonRequestError on a server-side error."""
        message = {
            "model_name": self.model_name,
            "inputs": self._inputs(request),
            "outputs": self._outputs,
            "request_id": request_id,
            # Lets the last response tell us the stream is over even when it carries no tokens.
            "enable_empty_final_response": True,
        }

        async def requests():
            yield message

        call = self._client.stream_infer(requests())
        finished = False
        try:
            async for result, error in call:
                if error is not None:
                    raise _parse_error(error)
                response = result.get_response()
                final = response.parameters["triton_final_response"].bool_param
                ids = result.as_numpy("output_ids")
                if ids is not None and ids.size:
                    yield contract.chunk_from_tensors(
                        ids, result.as_numpy("sequence_length"), result.as_numpy("output_log_probs"))
                if final:
                    finished = True
                    return
            raise TritonRequestError("the Triton stream ended without a final response", "internal")
        except InferenceServerException as exc:
            raise _parse_error(exc) from exc
        finally:
            if not finished:
                # Caller went away or an error occurred: tell Triton, which tells the model.
                call.cancel()

    async def close(self) -> None:
        if self._channel is not None:
            await self._channel.close()
            self._channel = None

