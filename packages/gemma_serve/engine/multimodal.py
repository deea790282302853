"""Images in the engine: what a request carries, where its image tokens are, and the feature cache.

Gemma 3 reads an image as `mm_tokens_per_image` consecutive image soft tokens (between
`<start_of_image>` and `<end_of_image>`, which the API layer writes). Each such run is one image, in
order; the embeddings of its tokens are replaced by the image's projected vision features, and the
tokens of one run attend to each other bidirectionally during prefill. Everything here is about
finding those runs, checking them against the images, and not encoding an image twice.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from gemma_serve.bounded_lru import BoundedLRU

from gemma_serve.engine.outputs import RequestRejectedError


@dataclass(frozen=True)
class ImageInput:
    """One image of a request, preprocessed by the API layer."""

    pixel_values: np.ndarray | torch.Tensor  # float32 [3, H, W], already resized + normalized
    content_hash: str  # hex digest of the image bytes, used for caching and block hashes


@dataclass(frozen=True)
class ImageSpan:
    """The [start, end) token positions of one image's soft tokens in a prompt."""

    start: int
    end: int
    image: ImageInput

    def key(self) -> bytes:
        """The image's identity for KV block hashes: its content hash, length-prefixed so that a
        concatenation of keys is unambiguous."""
        digest = self.image.content_hash.encode()
        return len(digest).to_bytes(2, "little") + digest


@dataclass(frozen=True)
class MultimodalConfig:
    """The image side of a Gemma 3 checkpoint (config.json with a `vision_config`)."""

    mm_tokens_per_image: int
    image_token_id: int
    boi_token_id: int
    eoi_token_id: int
    image_size: int
    patch_size: int
    vision_eps: float
    # The checkpoint's SigLIP `vision_config`, as transformers' SiglipVisionConfig reads it.
    vision: dict[str, Any] = field(hash=False, compare=False)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> MultimodalConfig | None:
        """None for text-only checkpoints. Defaults are transformers' Gemma3Config / SiglipVisionConfig
        ones, for keys that published configs leave out."""
        vision = raw.get("vision_config")
        if raw.get("model_type") != "gemma3" or not vision:
            return None

        def pick(*keys: str, default: int) -> int:
            return int(next((raw[k] for k in keys if raw.get(k) is not None), default))

        size, patch = vision.get("image_size", 224), vision.get("patch_size", 16)
        if not isinstance(size, int) or not isinstance(patch, int):
            raise ValueError(f"vision_config: only square images and patches are supported ({size}, {patch})")
        cfg = cls(
            mm_tokens_per_image=pick("mm_tokens_per_image", default=256),
            image_token_id=pick("image_token_index", "image_token_id", default=262_144),
            boi_token_id=pick("boi_token_index", "boi_token_id", default=255_999),
            eoi_token_id=pick("eoi_token_index", "eoi_token_id", default=256_000),
            image_size=size,
            patch_size=patch,
            vision_eps=float(vision.get("layer_norm_eps", 1e-6)),
            vision=dict(vision),
        )
        side = round(cfg.mm_tokens_per_image ** 0.5)
        patches = size // patch
        # The projector average-pools the square patch grid to a square grid of soft tokens.
        if side * side != cfg.mm_tokens_per_image or patches % side:
            raise ValueError(f"mm_tokens_per_image {cfg.mm_tokens_per_image} is not a square grid that pools "
                             f"the {patches}x{patches} patches evenly")
        return cfg

    @classmethod
    def from_folder(cls, folder: Path) -> MultimodalConfig | None:
        return cls.from_dict(json.loads((Path(folder) / "config.json").read_text()))


def image_runs(token_ids: list[int], image_token_id: int) -> list[tuple[int, int]]:
    """[start, end) of every maximal run of consecutive image tokens."""
    runs: list[tuple[int, int]] = []
    start = None
    for i, token in enumerate(token_ids):
        if token == image_token_id:
            if start is None:
                start = i
        elif start is not None:
            runs.append((start, i))
            start = None
    if start is not None:
        runs.append((start, len(token_ids)))
    return runs


def image_spans(token_ids: list[int], images: list[ImageInput] | None, mm: MultimodalConfig | None,
                max_num_batched_tokens: int) -> list[ImageSpan]:
    """Pair the prompt's image runs with the request's images, in order; RequestRejectedError (a
    ValueError: HTTP 400) when they do not fit together or the engine cannot compute them."""
    images = list(images or [])
    if mm is None:
        if images:
            raise RequestRejectedError("this model has no vision tower: it does not accept images")
        return []
    runs = image_runs(token_ids, mm.image_token_id)
    if len(runs) != len(images):
        raise RequestRejectedError(f"the prompt has {len(runs)} image token run(s) (token id {mm.image_token_id}) "
                                   f"for {len(images)} image(s)")
    if runs and mm.mm_tokens_per_image > max_num_batched_tokens:
        # One image's tokens attend to each other, so they are computed in one step (see Scheduler).
        raise RequestRejectedError(f"an image takes {mm.mm_tokens_per_image} tokens, more than the engine's "
                                   f"max_num_batched_tokens ({max_num_batched_tokens}) computes in one step")
    expected = (3, mm.image_size, mm.image_size)
    for i, ((start, end), image) in enumerate(zip(runs, images)):
        if end - start != mm.mm_tokens_per_image:
            raise RequestRejectedError(f"image {i}: its token run at position {start} has {end - start} image "
                                       f"tokens; this model reads {mm.mm_tokens_per_image} per image")
        shape = tuple(image.pixel_values.shape)
        if shape != expected:
            raise RequestRejectedError(f"image {i}: pixel_values have shape {shape}, expected {expected}")
        if not image.content_hash:
            raise RequestRejectedError(f"image {i}: content_hash is empty")
    return [ImageSpan(start, end, image) for (start, end), image in zip(runs, images)]


class FeatureCache(BoundedLRU[torch.Tensor]):
    """Projected features of recently seen images, by content hash, least recently used evicted
    first. Bounded by count and bytes: the real model's features are 256 x 2560 values per image."""

    def __init__(self, max_entries: int, max_bytes: int) -> None:
        super().__init__(max_entries, max_bytes, lambda t: t.numel() * t.element_size())

