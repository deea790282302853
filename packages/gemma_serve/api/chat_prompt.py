"""Chat messages -> what the engine reads: prompt token ids and, for Gemma 3 with a vision tower, the
images in message order.

    prompt = await builder.build(messages)   # ChatPrompt(ids, images); every problem is a 400

Text parts go through Gemma's chat template; each image part becomes `<start_of_image>` there, and is
then expanded into the image's full token run (`images.expand_image_tokens`), so `len(prompt.ids)`
counts the image tokens as the model sees them (usage.prompt_tokens). Deployments whose engine cannot
take images (TensorRT-LLM, text-only checkpoints) refuse image parts with a 400 that says why.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from gemma_serve.api import errors
from gemma_serve.api.images import (
    ImageLimits,
    ImagePreprocessor,
    ImageTokenLayout,
    PreparedImage,
    PreprocessConfig,
    expand_image_tokens,
)
from gemma_serve.api.schemas import Message
from gemma_serve.api.tokenizer import Tokenizer

logger = logging.getLogger(__name__)


@dataclass
class ChatPrompt:
    ids: list[int]
    images: list[PreparedImage] = field(default_factory=list)


@dataclass(frozen=True)
class ImageSupport:
    """What a deployment that takes images needs on the API side."""

    preprocessor: ImagePreprocessor
    layout: ImageTokenLayout

    @classmethod
    def from_checkpoint(cls, folder: str | Path, tokenizer: Tokenizer, limits: ImageLimits) -> ImageSupport | None:
        """None when the checkpoint has no vision tower (config.json without `vision_config`)."""
        folder = Path(folder)
        try:
            config = json.loads((folder / "config.json").read_text())
        except (OSError, ValueError):
            return None
        if not config.get("vision_config"):
            return None
        support = cls(ImagePreprocessor(PreprocessConfig.from_checkpoint(folder), limits),
                      ImageTokenLayout.from_checkpoint(folder, tokenizer))
        logger.info("images enabled: %dx%d pixels, %d tokens per image, at most %d per request",
                    support.preprocessor.config.height, support.preprocessor.config.width,
                    support.layout.tokens_per_image, limits.max_images)
        return support


class ChatPromptBuilder:
    def __init__(self, tokenizer: Tokenizer, images: ImageSupport | None, no_images_reason: str) -> None:
        self.tokenizer = tokenizer
        self.images = images
        # Why image parts are refused when `images` is None, for the 400's message.
        self.no_images_reason = no_images_reason

    async def build(self, messages: Sequence[Message]) -> ChatPrompt:
        ids = self.tokenizer.encode_chat(self.template_messages(messages))
        if self.images is None:
            return ChatPrompt(ids)
        prepared = await self.images.preprocessor.prepare_messages(messages)
        # The count check there also stops "<start_of_image>" typed as text from reaching the model.
        expanded = expand_image_tokens(ids, self.tokenizer, self.images.layout, num_images=len(prepared))
        return ChatPrompt(expanded.ids, prepared)

    def template_messages(self, messages: Sequence[Message]) -> list[dict]:
        """Messages as Gemma's chat template takes them: `developer` is `system`, content parts are
        `{"type": "text", "text": ...}` or `{"type": "image"}`."""
        out = []
        for m, message in enumerate(messages):
            role = "system" if message.role == "developer" else message.role
            if message.content is None or isinstance(message.content, str):
                out.append({"role": role, "content": message.content or ""})
                continue
            parts = []
            for p, part in enumerate(message.content):
                if part.type == "text":
                    parts.append({"type": "text", "text": part.text})
                elif self.images is None:
                    raise errors.invalid(f"image inputs are not supported by this deployment: {self.no_images_reason}",
                                         param=f"messages.{m}.content.{p}", code="unsupported_content")
                else:
                    parts.append({"type": "image"})
            out.append({"role": role, "content": parts})
        return out
