"""A checkpoint folder that serves a published model config with random weights through the whole stack,
on a machine that cannot download the model's tokenizer (Gemma's are gated; GPU machines may be offline).

The Truss process needs a tokenizer, and the random model samples ids from its whole vocabulary. This
writes a copy of the config (serve it with `load_format=random`) and beside it the tiny model's tokenizer
(real BPE with byte fallback, Gemma's special tokens and chat template) whose vocabulary is padded up to
the config's `vocab_size` with filler tokens that decode to one short word each. So prompts encode to the
tiny vocabulary's low ids, and every id the model samples decodes to visible text: the stream carries one
text chunk per token, as a real tokenizer's would, and the streaming detokenizer does its normal work.

    python -m gemma_serve.bench.shapes_checkpoint bench/configs/gemma-3-4b-it OUT_DIR
    GEMMA_SERVE_MODEL=OUT_DIR GEMMA_SERVE_LOAD_FORMAT=random python -m gemma_serve serve
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from gemma_serve import tiny_model

FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json", "chat_template.jinja")


def filler_token(token_id: int) -> str:
    """The padding token for `token_id`: a word start ("▁" decodes to a space) and a few characters."""
    return f"▁w{token_id:x}"


def make_shapes_checkpoint(config_dir: Path, out_dir: Path) -> Path:
    """Write `out_dir` (config.json copied from `config_dir`, tokenizer padded to its vocab_size)."""
    config_text = (Path(config_dir) / "config.json").read_text()
    config = json.loads(config_text)
    vocab_size = int(config.get("text_config", config)["vocab_size"])
    tokenizer = json.loads(tiny_model.build_tokenizer().to_str())
    vocab: dict[str, int] = tokenizer["model"]["vocab"]
    if vocab_size < len(vocab):
        raise ValueError(f"vocab_size {vocab_size} is smaller than the tiny tokenizer's {len(vocab)}")
    vocab.update((filler_token(i), i) for i in range(len(vocab), vocab_size))
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "config.json").write_text(config_text)
    (out_dir / "tokenizer.json").write_text(json.dumps(tokenizer, ensure_ascii=False))
    (out_dir / "tokenizer_config.json").write_text(json.dumps(tiny_model.tokenizer_config(), indent=2))
    (out_dir / "generation_config.json").write_text(json.dumps(tiny_model.generation_config(), indent=2))
    (out_dir / "chat_template.jinja").write_text(tiny_model.chat_template())
    return out_dir


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config_dir", type=Path, help="folder with the model's config.json")
    parser.add_argument("out_dir", type=Path)
    args = parser.parse_args(argv)
    print(make_shapes_checkpoint(args.config_dir, args.out_dir))
    return 0


if __name__ == "__main__":
    sys.exit(main())
