"""The Truss process owns the tokenizer: prompts and chat messages become token ids here, once for
both engines, and ids become text again in the detokenizer."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from gemma_serve.api.errors import invalid

logger = logging.getLogger(__name__)

# Gemma's chat format, used when a tokenizer ships without a chat template (shared with the tiny model).
FALLBACK_TEMPLATE = Path(__file__).resolve().parent.parent / "chat_template.jinja"
# Cap for the context window when the model's own is larger than the deployment needs.
DEFAULT_MAX_MODEL_LEN = 8192


def resolve_model_dir(name_or_path: str, token: str | None = None, revision: str | None = None,
                      patterns: Sequence[str] = ("*.json", "*.jinja", "tokenizer*")) -> Path:
    """A local folder as is; a Hugging Face repo id downloaded (only the files in `patterns`)."""
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return path
    if path.exists() or name_or_path.startswith((".", "/")):
        raise FileNotFoundError(f"model folder not found: {name_or_path}")
    from huggingface_hub import snapshot_download

    logger.info("downloading %s from the Hugging Face hub (%s)", name_or_path, ", ".join(patterns))
    return Path(snapshot_download(name_or_path, token=token, revision=revision, allow_patterns=list(patterns)))


@dataclass
class TokenizerInfo:
    end_id: int  # the first end-of-sequence id, the contract's `end_id`
    stop_ids: list[int]  # every id that ends generation (EOS, end-of-turn)
    pad_id: int
    bos_id: int | None
    max_model_len: int


class Tokenizer:
    def __init__(self, hf_tokenizer: Any, info: TokenizerInfo, folder: Path | None = None) -> None:
        self.hf = hf_tokenizer
        self.info = info
        # The checkpoint folder it came from (config.json, preprocessor_config.json live there too).
        self.folder = folder
        template = getattr(hf_tokenizer, "chat_template", None)
        self._template = template if template else FALLBACK_TEMPLATE.read_text()

    @classmethod
    def load(cls, name_or_path: str, token: str | None = None, revision: str | None = None,
             max_model_len: int | None = None) -> "Tokenizer":
        from transformers import AutoTokenizer

        folder = resolve_model_dir(name_or_path, token, revision)
        hf = AutoTokenizer.from_pretrained(str(folder))
        return cls(hf, _info(folder, hf, max_model_len), folder)

    def encode_prompt(self, text: str) -> list[int]:
        """Raw completion prompt: BOS + text, as the model was trained."""
        return list(self.hf(text, add_special_tokens=True)["input_ids"])

    def render_chat(self, messages: list[dict]) -> str:
        try:
            return self.hf.apply_chat_template(messages, chat_template=self._template, tokenize=False,
                                               add_generation_prompt=True)
        except Exception as exc:  # jinja's raise_exception: roles out of order, unsupported content
            raise invalid(f"messages cannot be rendered with the chat template: {exc}", param="messages") from exc

    def encode_chat(self, messages: list[dict]) -> list[int]:
        # The template writes <bos> itself; adding special tokens again would double it.
        return list(self.hf(self.render_chat(messages), add_special_tokens=False)["input_ids"])

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self.hf.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def count(self, text: str) -> int:
        return len(self.hf(text, add_special_tokens=False)["input_ids"])


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def _info(folder: Path, hf: Any, max_model_len: int | None) -> TokenizerInfo:
    config = _read_json(folder / "config.json")
    text_config = config.get("text_config", config)
    generation = _read_json(folder / "generation_config.json")
    stop_ids: list[int] = []
    for source in (generation.get("eos_token_id"), config.get("eos_token_id"), text_config.get("eos_token_id"),
                   hf.eos_token_id):
        for i in source if isinstance(source, list) else [source]:
            if isinstance(i, int) and i not in stop_ids:
                stop_ids.append(i)
    # Chat models end a turn with <end_of_turn>; older configs list only <eos>.
    end_of_turn = hf.convert_tokens_to_ids("<end_of_turn>") if "<end_of_turn>" in hf.get_vocab() else None
    if isinstance(end_of_turn, int) and end_of_turn not in stop_ids:
        stop_ids.append(end_of_turn)
    if not stop_ids:
        raise ValueError(f"no end-of-sequence token found in {folder}")
    model_len = text_config.get("max_position_embeddings") or DEFAULT_MAX_MODEL_LEN
    pad = hf.pad_token_id if hf.pad_token_id is not None else 0
    return TokenizerInfo(
        end_id=stop_ids[0], stop_ids=stop_ids, pad_id=pad, bos_id=hf.bos_token_id,
        max_model_len=max_model_len or min(int(model_len), DEFAULT_MAX_MODEL_LEN),
    )
