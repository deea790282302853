"""Truss entry point. Thin on purpose: settings -> GemmaService; every route delegates to it.

`load()` starts tritonserver with the configured engine and connects the gRPC client; each route
takes the raw request (so JSON errors get our error body, not the server's) and returns a response.
"""

# No `from __future__ import annotations` here: truss inspects the `Request` annotation objects to
# decide that these methods take the raw request (and parse the body themselves).
import logging
import os
from typing import Any, Optional

from starlette.requests import Request
from starlette.responses import Response

from gemma_serve.api.service import GemmaService
from gemma_serve.settings import ServingSettings

logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")


class Model:
    def __init__(self, **kwargs: Any) -> None:
        config = kwargs.get("config") or {}
        self._settings = ServingSettings.load(config.get("model_metadata") or {})
        secrets = kwargs.get("secrets") or {}
        try:
            self._hf_token = secrets["hf_access_token"] or None
        except Exception:  # truss raises its own error type for a secret that is not set
            self._hf_token = None
        # Outside Baseten (make serve, truss image build on your GPUs) the usual variable works too.
        self._hf_token = self._hf_token or os.environ.get("HF_TOKEN") or None
        self._data_dir = kwargs.get("data_dir")
        self._service: Optional[GemmaService] = None

    def load(self) -> None:
        self._service = GemmaService.start(self._settings, self._hf_token, self._data_dir)

    async def predict(self, request: Request) -> Response:
        return await self._service.predict(request)

    async def chat_completions(self, request: Request) -> Response:
        return await self._service.chat_completions(request)

    async def completions(self, request: Request) -> Response:
        return await self._service.completions(request)
