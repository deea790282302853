"""Request bodies and stream events of the three endpoints a run can target.

chat and completions are OpenAI's streaming routes (SSE, a usage chunk when asked with
`stream_options.include_usage`); predict is Truss's route, which streams plain text chunks and no usage.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from gemma_serve.bench.workload import Prompt

ENDPOINTS = ("chat", "completions", "predict")


@dataclass(frozen=True)
class StreamEvent:
    text: str = ""  # generated text carried by the event ("" for role-only and usage-only events)
    usage: dict[str, Any] | None = None
    finish_reason: str | None = None
    error: str | None = None


@dataclass(frozen=True)
class Endpoint:
    name: str
    path: str
    sse: bool  # False: the body is plain text chunks (Truss predict)

    def body(self, prompt: Prompt, model: str | None, output_len: int, ignore_eos: bool,
             extra: dict[str, Any] | None = None) -> dict[str, Any]:
        body: dict[str, Any] = {}
        if model and self.name != "predict":
            body["model"] = model
        if self.name == "chat":
            body["messages"] = prompt.as_messages()
        elif self.name == "completions":
            body["prompt"] = prompt.as_text()
        elif prompt.messages is not None:
            body["messages"] = prompt.as_messages()
        else:
            body["prompt"] = prompt.text
        body["max_tokens"] = output_len
        body["stream"] = True
        if self.sse:
            body["stream_options"] = {"include_usage": True}
        if ignore_eos:
            # vLLM-style extensions: generate exactly output_len tokens whatever the model would stop on.
            body["ignore_eos"] = True
            body["min_tokens"] = output_len
        body.update(extra or {})
        return body

    def parse(self, event: dict[str, Any]) -> StreamEvent:
        """One decoded SSE `data:` payload of this endpoint."""
        if "error" in event:
            err = event["error"]
            return StreamEvent(error=err.get("message", str(err)) if isinstance(err, dict) else str(err))
        text, finish = "", None
        choices = event.get("choices") or []
        if choices:
            choice = choices[0]
            if self.name == "chat":
                text = (choice.get("delta") or {}).get("content") or ""
            else:
                text = choice.get("text") or ""
            finish = choice.get("finish_reason")
        return StreamEvent(text=text, usage=event.get("usage") or None, finish_reason=finish)


_BY_NAME = {
    "chat": Endpoint("chat", "/v1/chat/completions", sse=True),
    "completions": Endpoint("completions", "/v1/completions", sse=True),
    "predict": Endpoint("predict", "/v1/models/model:predict", sse=False),
}


def get_endpoint(name: str) -> Endpoint:
    try:
        return _BY_NAME[name]
    except KeyError:
        raise ValueError(f"unknown endpoint {name!r}: choose one of {', '.join(ENDPOINTS)}") from None


def join_url(base_url: str, path: str) -> str:
    """`base_url` may name the server root or its /v1 prefix (OpenAI clients take the latter)."""
    base = base_url.rstrip("/")
    if base.endswith("/v1") and path.startswith("/v1/"):
        base = base[: -len("/v1")]
    return base + path
