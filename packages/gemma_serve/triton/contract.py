"""The token-level tensor contract between the Truss process and Triton.

Named after the TensorRT-LLM backend's `tensorrt_llm` model, so that `model.py` does not know which
engine answers: the portable engine's Triton model declares exactly these tensors, and so does the
TensorRT-LLM template. Tokens cross this boundary, text never does.

Every tensor carries a leading batch dimension of 1 (both models set `max_batch_size > 0`).

Images (portable engine only): `pixel_values` [num_images, 3, H, W] float32, resized and normalized by
the API layer, and `image_hashes` [num_images] (hex digests of the image files) that the engine keys its
feature cache and prefix cache on. The prompt's `input_ids` already hold each image's tokens. They are
not TensorRT-LLM tensors: the TensorRT-LLM model does not declare them, and the API layer refuses images
before they would be sent there.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, Mapping, Sequence

import numpy as np

# Triton data type name -> numpy dtype.
_NUMPY = {"INT32": np.int32, "UINT64": np.uint64, "FP32": np.float32, "BOOL": np.bool_, "BYTES": np.object_}


@dataclass(frozen=True)
class TensorSpec:
    name: str
    data_type: str  # Triton's name without the TYPE_ prefix: INT32, UINT64, FP32, BOOL, BYTES (TYPE_STRING)
    dims: tuple[int, ...]  # per-request dims, without the batch dimension
    optional: bool = True

    @property
    def numpy_dtype(self) -> type:
        return _NUMPY[self.data_type]

    @property
    def config_type(self) -> str:
        """The type as a model's config.pbtxt writes it (variable-length bytes are TYPE_STRING there)."""
        return "TYPE_STRING" if self.data_type == "BYTES" else f"TYPE_{self.data_type}"


INPUTS: tuple[TensorSpec, ...] = (
    TensorSpec("input_ids", "INT32", (-1,), optional=False),
    TensorSpec("input_lengths", "INT32", (1,), optional=False),
    TensorSpec("request_output_len", "INT32", (1,), optional=False),
    TensorSpec("streaming", "BOOL", (1,)),
    TensorSpec("end_id", "INT32", (1,)),
    TensorSpec("pad_id", "INT32", (1,)),
    TensorSpec("temperature", "FP32", (1,)),
    TensorSpec("runtime_top_k", "INT32", (1,)),
    TensorSpec("runtime_top_p", "FP32", (1,)),
    TensorSpec("repetition_penalty", "FP32", (1,)),
    TensorSpec("presence_penalty", "FP32", (1,)),
    TensorSpec("frequency_penalty", "FP32", (1,)),
    TensorSpec("random_seed", "UINT64", (1,)),
    TensorSpec("min_length", "INT32", (1,)),
    TensorSpec("stop_words_list", "INT32", (2, -1)),
    TensorSpec("bad_words_list", "INT32", (2, -1)),
    TensorSpec("return_log_probs", "BOOL", (1,)),
)

# The portable engine's image inputs (see the module docstring); appended to its model's inputs.
IMAGE_INPUTS: tuple[TensorSpec, ...] = (
    TensorSpec("pixel_values", "FP32", (-1, 3, -1, -1)),
    TensorSpec("image_hashes", "BYTES", (-1,)),
)

OUTPUTS: tuple[TensorSpec, ...] = (
    # [beam, tokens]: in streaming mode, the tokens produced since the previous response.
    TensorSpec("output_ids", "INT32", (-1, -1), optional=False),
    # [beam]: prompt + generated tokens so far.
    TensorSpec("sequence_length", "INT32", (-1,), optional=False),
    TensorSpec("output_log_probs", "FP32", (-1, -1)),
    TensorSpec("cum_log_probs", "FP32", (-1,)),
)

INPUT_NAMES = tuple(spec.name for spec in INPUTS + IMAGE_INPUTS)
_INPUT_BY_NAME = {spec.name: spec for spec in INPUTS + IMAGE_INPUTS}


@dataclass
class GenerationRequest:
    """One generation request in tokens: what the API layer sends and the engine model receives."""

    input_ids: list[int]
    max_tokens: int
    end_id: int
    pad_id: int = 0
    streaming: bool = True
    # Greedy is `top_k == 1` (TensorRT-LLM has no temperature 0); the API layer maps temperature 0 to it.
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    min_tokens: int = 0
    # Token sequences that end the request (EOS ids beyond `end_id`, end-of-turn, stop tokens).
    stop_sequences: list[list[int]] = field(default_factory=list)
    bad_sequences: list[list[int]] = field(default_factory=list)
    logprobs: bool = False
    # [num_images, 3, H, W] float32 and one content hash per image; None / [] for a text prompt.
    pixel_values: np.ndarray | None = None
    image_hashes: list[str] = field(default_factory=list)

    @property
    def num_images(self) -> int:
        return 0 if self.pixel_values is None else int(self.pixel_values.shape[0])


def encode_word_list(words: Sequence[Sequence[int]]) -> np.ndarray:
    """TensorRT-LLM's word-list layout, [2, L]: row 0 the concatenated ids, row 1 the end offsets,
    both padded with -1."""
    flat = [int(t) for word in words for t in word]
    offsets = list(np.cumsum([len(word) for word in words]).tolist()) if words else []
    width = max(len(flat), 1)
    out = np.full((2, width), -1, dtype=np.int32)
    out[0, : len(flat)] = flat
    out[1, : len(offsets)] = offsets
    return out


def decode_word_list(array: np.ndarray) -> list[list[int]]:
    """Inverse of `encode_word_list`."""
    ids, offsets = array[0], array[1]
    words: list[list[int]] = []
    start = 0
    for end in offsets:
        if end < 0:
            break
        words.append([int(t) for t in ids[start:end]])
        start = int(end)
    return [w for w in words if w]


def to_tensors(request: GenerationRequest) -> dict[str, np.ndarray]:
    """Request -> the contract's tensors, each with a leading batch dimension of 1."""
    values: dict[str, object] = {
        "input_ids": request.input_ids,
        "input_lengths": [len(request.input_ids)],
        "request_output_len": [request.max_tokens],
        "streaming": [request.streaming],
        "end_id": [request.end_id],
        "pad_id": [request.pad_id],
        "temperature": [request.temperature],
        "runtime_top_k": [request.top_k],
        "runtime_top_p": [request.top_p],
        "repetition_penalty": [request.repetition_penalty],
        "presence_penalty": [request.presence_penalty],
        "frequency_penalty": [request.frequency_penalty],
        "min_length": [request.min_tokens],
        "return_log_probs": [request.logprobs],
    }
    if request.seed is not None:
        values["random_seed"] = [request.seed]
    if request.stop_sequences:
        values["stop_words_list"] = encode_word_list(request.stop_sequences)
    if request.bad_sequences:
        values["bad_words_list"] = encode_word_list(request.bad_sequences)
    if request.num_images:
        if len(request.image_hashes) != request.num_images:
            raise ValueError(f"{request.num_images} images but {len(request.image_hashes)} image hashes")
        values["pixel_values"] = request.pixel_values
        values["image_hashes"] = np.array([h.encode() for h in request.image_hashes], dtype=np.object_)
    return {name: np.asarray(v, dtype=_INPUT_BY_NAME[name].numpy_dtype)[None, ...] for name, v in values.items()}


def from_tensors(tensors: Mapping[str, np.ndarray]) -> GenerationRequest:
    """The contract's tensors (batch dimension 1) -> request. Missing optional tensors take defaults."""
    unknown = set(tensors) - set(INPUT_NAMES)
    if unknown:
        raise ValueError(f"unknown input tensors: {sorted(unknown)}")
    for spec in INPUTS:
        if not spec.optional and spec.name not in tensors:
            raise ValueError(f"missing required input tensor '{spec.name}'")

    def scalar(name: str, default):
        if name not in tensors:
            return default
        return np.asarray(tensors[name]).reshape(-1)[0].item()

    input_ids = np.asarray(tensors["input_ids"]).reshape(-1).tolist()
    length = int(scalar("input_lengths", len(input_ids)))
    if not 0 < length <= len(input_ids):
        raise ValueError(f"input_lengths={length} does not fit input_ids of length {len(input_ids)}")
    seed = scalar("random_seed", None)
    return GenerationRequest(
        input_ids=[int(t) for t in input_ids[:length]],
        max_tokens=int(scalar("request_output_len", 0)),
        end_id=int(scalar("end_id", -1)),
        pad_id=int(scalar("pad_id", 0)),
        streaming=bool(scalar("streaming", False)),
        temperature=float(scalar("temperature", 1.0)),
        top_k=int(scalar("runtime_top_k", 0)),
        top_p=float(scalar("runtime_top_p", 1.0)),
        repetition_penalty=float(scalar("repetition_penalty", 1.0)),
        presence_penalty=float(scalar("presence_penalty", 0.0)),
        frequency_penalty=float(scalar("frequency_penalty", 0.0)),
        seed=None if seed is None else int(seed),
        min_tokens=int(scalar("min_length", 0)),
        stop_sequences=_word_list(tensors, "stop_words_list"),
        bad_sequences=_word_list(tensors, "bad_words_list"),
        logprobs=bool(scalar("return_log_probs", False)),
        **_images(tensors),
    )


def _images(tensors: Mapping[str, np.ndarray]) -> dict:
    if "pixel_values" not in tensors:
        if "image_hashes" in tensors:
            raise ValueError("image_hashes without pixel_values")
        return {}
    pixels = np.asarray(tensors["pixel_values"], dtype=np.float32)
    if pixels.ndim == 5:  # the batch dimension
        pixels = pixels[0]
    if pixels.ndim != 4 or pixels.shape[1] != 3:
        raise ValueError(f"pixel_values must be [images, 3, height, width], got {list(pixels.shape)}")
    raw = np.asarray(tensors.get("image_hashes", np.empty(0, dtype=np.object_))).reshape(-1)
    hashes = [h.decode() if isinstance(h, bytes) else str(h) for h in raw]
    if len(hashes) != pixels.shape[0]:
        raise ValueError(f"{pixels.shape[0]} images in pixel_values but {len(hashes)} image_hashes")
    return {"pixel_values": pixels, "image_hashes": hashes}


def _word_list(tensors: Mapping[str, np.ndarray], name: str) -> list[list[int]]:
    if name not in tensors:
        return []
    array = np.asarray(tensors[name])
    return decode_word_list(array.reshape(array.shape[-2:]))


@dataclass
class TokenChunk:
    """One streamed response, decoded from the contract's output tensors."""

    token_ids: list[int]
    sequence_length: int
    logprobs: list[float] | None = None


def chunk_to_tensors(chunk: TokenChunk) -> dict[str, np.ndarray]:
    """Engine side: a chunk -> output tensors with batch 1 and beam 1."""
    out = {
        "output_ids": np.asarray(chunk.token_ids, dtype=np.int32).reshape(1, 1, -1),
        "sequence_length": np.asarray([chunk.sequence_length], dtype=np.int32).reshape(1, 1),
    }
    if chunk.logprobs is not None:
        out["output_log_probs"] = np.asarray(chunk.logprobs, dtype=np.float32).reshape(1, 1, -1)
        out["cum_log_probs"] = np.asarray([sum(chunk.logprobs)], dtype=np.float32).reshape(1, 1)
    return out


def chunk_from_tensors(output_ids: np.ndarray | None, sequence_length: np.ndarray | None,
                       output_log_probs: np.ndarray | None = None) -> TokenChunk:
    """Client side: output tensors (batch 1, beam 1) -> chunk."""
    ids: Iterable[int] = [] if output_ids is None else np.asarray(output_ids).reshape(-1).tolist()
    length = 0 if sequence_length is None else int(np.asarray(sequence_length).reshape(-1)[0])
    logprobs = None if output_log_probs is None else np.asarray(output_log_probs).reshape(-1).tolist()
    return TokenChunk(token_ids=[int(t) for t in ids], sequence_length=length, logprobs=logprobs)
