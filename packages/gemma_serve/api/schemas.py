"""Request schemas of the Truss predict route, and the sampling fields every route shares.

Types are strict (a string where a number belongs is an error, not coerced); unknown fields are
ignored, as OpenAI clients send fields this server does not use.
"""

from __future__ import annotations

from typing import Literal, Union

from pydantic import BaseModel, ConfigDict, Field, model_validator


class TextPart(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)
    type: Literal["text"]
    text: str


class ImageURL(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)
    url: str
    detail: str | None = None


class ImagePart(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)
    type: Literal["image_url"]
    image_url: ImageURL


ContentPart = Union[TextPart, ImagePart]


class Message(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)
    role: Literal["system", "user", "assistant", "developer"]
    content: str | list[ContentPart] | None = None
    name: str | None = None


class SamplingFields(BaseModel):
    """Fields shared by predict, chat completions and completions."""

    model_config = ConfigDict(extra="ignore", strict=True)

    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    # Extensions beyond OpenAI's fields (as in vLLM): top_k 0 disables it.
    top_k: int = Field(0, ge=0)
    repetition_penalty: float = Field(1.0, gt=0.0, le=10.0)
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=0, le=2**63 - 1)
    stream: bool = False
    min_tokens: int = Field(0, ge=0)
    # Keep generating past end-of-sequence tokens (benchmarks that need a fixed output length).
    ignore_eos: bool = False

    @property
    def stop_strings(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)

    @model_validator(mode="after")
    def _check_stop(self) -> "SamplingFields":
        if isinstance(self.stop, list) and len(self.stop) > 16:
            raise ValueError("at most 16 stop strings")
        return self


class PredictRequest(SamplingFields):
    """Truss predict: `{"prompt": ...}` or `{"messages": [...]}` plus sampling fields."""

    prompt: str | None = None
    messages: list[Message] | None = None

    @model_validator(mode="after")
    def _one_input(self) -> "PredictRequest":
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("give exactly one of 'prompt' (a string) or 'messages' (a list of chat messages)")
        if self.messages is not None and not self.messages:
            raise ValueError("'messages' must not be empty")
        return self
