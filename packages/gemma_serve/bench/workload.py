"""Prompts for a run: random text of a set input length, or rows of a JSONL data set; seeded, so repeatable.

Lengths are in tokens. Without a tokenizer they are estimated with a words-per-token rule of thumb (the
report also shows the prompt tokens the server counted, so the estimate's error is visible); with a
tokenizer folder (transformers AutoTokenizer) random prompts are cut to exactly `input_len` tokens.
Counts cover the prompt text only: the chat template adds its own few tokens around it.
"""

from __future__ import annotations

import dataclasses
import functools
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

# OpenAI's rule of thumb for English prose (~4 characters, ~3/4 of a word per token). Not measured on
# Gemma's tokenizer; pass --tokenizer for exact counts.
WORDS_PER_TOKEN = 0.75

# Plain English words: random sequences of them look like text to a tokenizer (no rare byte runs), and
# random order keeps prompts from sharing prefixes, so a prefix cache cannot flatter the numbers.
_WORDS = """
the of and to in is was for that with as on by at from his her which have are this be an not or had it
they were but their been has one all there would who will more when its can if about also other into
time people year new first after some only like over many may most such state world them could than
these any then made city part where between because during while before under both through against three
later each several although following since those until around without early second known government
school house water family music company power system number development public service group program
national church member market field control process country village small large great long little right
high different important local social political general better strong simple light heavy quiet bright
careful friendly open ready recent common walk speak write read build carry follow change bring begin
learn answer travel measure return morning evening river mountain garden window kitchen station library
bridge island forest valley engine signal letter picture question machine moment reason pattern surface
weather orange yellow
""".split()  # noqa: SIM905 (a paragraph of words reads better than a list literal)


class TextTokenizer(Protocol):
    def encode(self, text: str, add_special_tokens: bool = ...) -> list[int]: ...

    def decode(self, ids: list[int]) -> str: ...


@dataclass(frozen=True)
class Prompt:
    text: str | None  # a plain prompt (completions, predict)
    messages: tuple[dict[str, Any], ...] | None  # a chat (chat completions, predict)
    input_tokens: int  # estimated, or counted when `exact` (text only: image tokens are the server's)
    exact: bool
    images: tuple[str, ...] = ()  # data: URLs, sent as OpenAI image parts after the text

    def as_text(self) -> str:
        """The prompt as one string: a chat's message contents joined (for the completions endpoint)."""
        if self.text is not None:
            return self.text
        return "\n".join(_content_text(m.get("content")) for m in self.messages or ())

    def as_messages(self) -> list[dict[str, Any]]:
        messages = [dict(m) for m in self.messages] if self.messages is not None else \
            [{"role": "user", "content": self.text}]
        if self.images:  # the images go into the last message, after its text
            last = messages[-1]
            content = last.get("content")
            parts = content if isinstance(content, list) else [{"type": "text", "text": content or ""}]
            last["content"] = list(parts) + [{"type": "image_url", "image_url": {"url": u}} for u in self.images]
        return messages


def _content_text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # OpenAI content parts: keep the text parts
        return " ".join(p.get("text", "") for p in content if isinstance(p, dict))
    return ""


@functools.lru_cache(maxsize=4)  # a sweep's runs share one tokenizer (loading takes seconds)
def load_tokenizer(path: str) -> TextTokenizer:
    # Imported here: it takes seconds, and only --tokenizer needs it.
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)


def estimate_tokens(text: str) -> int:
    return max(1, round(len(text.split()) / WORDS_PER_TOKEN))


def read_dataset(path: str | Path) -> list[dict[str, Any]]:
    """Rows of a JSONL file, each with a "prompt" string or a "messages" list (other fields are ignored)."""
    rows = []
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            row = json.loads(line)
            if isinstance(row.get("prompt"), str):
                rows.append({"prompt": row["prompt"]})
            elif isinstance(row.get("messages"), list) and row["messages"]:
                rows.append({"messages": row["messages"]})
            else:
                raise ValueError(f"{path}:{line_no}: a row needs a 'prompt' string or a 'messages' list")
    if not rows:
        raise ValueError(f"{path}: no prompts")
    return rows


IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".gif")


class ImageSource:
    """Images for prompts, as data: URLs: the files of a folder (in a seeded order), or generated ones.

    Generated images are smooth random colour fields (a coarse random grid, upscaled), different for
    every request and image, so neither a feature cache nor a prefix cache can serve them; they compress
    to a realistic PNG size, unlike pixel noise."""

    def __init__(self, folder: str | Path | None = None, size: int = 896, seed: int = 0) -> None:
        self.size = size
        self.seed = seed
        self.files: list[Path] = []
        if folder is not None:
            self.files = sorted(p for p in Path(folder).iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
            if not self.files:
                raise ValueError(f"{folder}: no images ({', '.join(IMAGE_SUFFIXES)})")
            np.random.default_rng(seed).shuffle(self.files)

    def data_url(self, index: int) -> str:
        import base64
        import mimetypes

        if self.files:
            path = self.files[index % len(self.files)]
            media = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
            return f"data:{media};base64,{base64.b64encode(path.read_bytes()).decode()}"
        return f"data:image/png;base64,{base64.b64encode(self.generate(index)).decode()}"

    def generate(self, index: int) -> bytes:
        import io

        from PIL import Image

        rng = np.random.default_rng((self.seed, index))
        coarse = rng.integers(0, 256, size=(8, 8, 3), dtype=np.uint8)
        img = Image.fromarray(coarse, "RGB").resize((self.size, self.size), Image.Resampling.BICUBIC)
        out = io.BytesIO()
        img.save(out, "PNG")
        return out.getvalue()


class WorkloadGenerator:
    """Makes the prompts of a run from `seed`: the same arguments give the same prompts."""

    def __init__(self, input_len: int = 128, seed: int = 0, tokenizer: TextTokenizer | None = None,
                 dataset: list[dict[str, Any]] | None = None, images_per_request: int = 0,
                 image_source: ImageSource | None = None) -> None:
        if input_len < 1:
            raise ValueError("input_len must be >= 1")
        if images_per_request < 0:
            raise ValueError("images_per_request must be >= 0")
        self.input_len = input_len
        self.seed = seed
        self.tokenizer = tokenizer
        self.dataset = dataset
        self.images_per_request = images_per_request
        self.image_source = image_source or (ImageSource(seed=seed) if images_per_request else None)

    def prompts(self, n: int) -> list[Prompt]:
        rng = np.random.default_rng(self.seed)
        if self.dataset is not None:
            # A seeded shuffle, then cycle when the run wants more prompts than the file has.
            order = rng.permutation(len(self.dataset))
            prompts = [self._from_row(self.dataset[order[i % len(order)]]) for i in range(n)]
        else:
            prompts = [self._random(rng) for _ in range(n)]
        if not self.images_per_request:
            return prompts
        k = self.images_per_request
        return [dataclasses.replace(p, images=tuple(self.image_source.data_url(i * k + j) for j in range(k)))
                for i, p in enumerate(prompts)]

    def count_tokens(self, text: str) -> int:
        if self.tokenizer is not None:
            return len(self.tokenizer.encode(text, add_special_tokens=False))
        return estimate_tokens(text)

    def _from_row(self, row: dict[str, Any]) -> Prompt:
        if "prompt" in row:
            return Prompt(row["prompt"], None, self.count_tokens(row["prompt"]), self.tokenizer is not None)
        prompt = Prompt(None, tuple(row["messages"]), 0, self.tokenizer is not None)
        return Prompt(None, prompt.messages, self.count_tokens(prompt.as_text()), prompt.exact)

    def _words(self, rng: np.random.Generator, n: int) -> str:
        return " ".join(_WORDS[i] for i in rng.integers(0, len(_WORDS), size=n))

    def _random(self, rng: np.random.Generator) -> Prompt:
        if self.tokenizer is None:
            text = self._words(rng, max(1, round(self.input_len * WORDS_PER_TOKEN)))
            return Prompt(text, None, self.input_len, False)
        return self._exact(rng)

    def _exact(self, rng: np.random.Generator) -> Prompt:
        tok = self.tokenizer
        n = self.input_len
        ids: list[int] = []
        while len(ids) < n + 8:  # random words until there are more tokens than needed
            ids = tok.encode(self._words(rng, 2 * n + 16), add_special_tokens=False)
        # Decoding a cut and re-encoding can merge or split at the cut: nudge the cut until it round-trips.
        cut, text, count = n, "", -1
        for _ in range(8):
            text = tok.decode(ids[:cut])
            count = len(tok.encode(text, add_special_tokens=False))
            if count == n:
                break
            cut = max(1, cut + n - count)
        return Prompt(text, None, count, True)
