"""A deterministic tiny Gemma 3 checkpoint in Hugging Face layout, for `make serve` and the tests.

Same layout as google/gemma-3-4b-it (Gemma3ForConditionalGeneration: text decoder, a tiny SigLIP
vision tower and projector, tokenizer.json + tokenizer_config.json with the chat template), a few
hundred kB of random weights. Its text is gibberish; everything around it is real.

    python -m gemma_serve make-tiny-model [OUT_DIR] [--force]
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

# Special tokens at fixed ids (the real model uses the same strings at other ids).
PAD, EOS, BOS, UNK, MASK = 0, 1, 2, 3, 4
START_OF_TURN, END_OF_TURN, START_OF_IMAGE, END_OF_IMAGE, IMAGE_TOKEN = 5, 6, 7, 8, 9
SPECIAL_TOKENS = ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>", "<start_of_turn>", "<end_of_turn>",
                  "<start_of_image>", "<end_of_image>", "<image_soft_token>"]
VOCAB_SIZE = 1024
MM_TOKENS_PER_IMAGE = 64
CHAT_TEMPLATE = Path(__file__).with_name("chat_template.jinja")
# Bump when the checkpoint's content changes, so cached copies are rebuilt.
VERSION = "1"

# The tokenizer's training text: English prose plus non-ASCII text, so common words become tokens and
# the rest (accents, CJK, emoji) goes through byte fallback, as with Gemma's real tokenizer.
CORPUS = """
The quick brown fox jumps over the lazy dog. A journey of a thousand miles begins with a single step.
Language models read text as tokens and write text one token at a time. Serving them well means
batching requests, caching keys and values, and streaming every token as soon as it is ready.
Once upon a time, in a small town by the sea, there lived a curious engineer who measured everything.
What is the capital of France? The capital of France is Paris. How are you today? I am well, thank you.
Write a short poem about the ocean. The waves roll in, the waves roll out, and the gulls cry overhead.
Numbers such as 1, 2, 3, 10, 42, 100 and 2026 appear in text; so do symbols like (), [], {}, <, >, =, +.
Hello world! Hello there. Good morning, good evening, good night. Please explain how this works.
The system prompt says: you are a helpful assistant. The user asks a question and the model answers.
café, naïve, résumé, façade, über, señor — 東京, 北京, こんにちは, 안녕하세요 — 🦊🚀✨
"""


def _train_tokenizer():
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, processors, trainers

    def configure(tok: Tokenizer) -> Tokenizer:
        tok.normalizer = normalizers.Replace(" ", "▁")
        tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
        return tok

    # 1. Learn merges on the corpus (deterministic: the trainer breaks ties by order).
    trainer_tok = configure(Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True)))
    trainer = trainers.BpeTrainer(vocab_size=VOCAB_SIZE - 256, special_tokens=SPECIAL_TOKENS, show_progress=False)
    trainer_tok.train_from_iterator([line for line in CORPUS.splitlines() if line.strip()], trainer)
    learned = json.loads(trainer_tok.to_str())["model"]
    # 2. Final vocabulary: special tokens, the 256 byte tokens, then the learned pieces.
    vocab: dict[str, int] = {t: i for i, t in enumerate(SPECIAL_TOKENS)}
    for b in range(256):
        vocab[f"<0x{b:02X}>"] = len(vocab)
    for piece, _ in sorted(learned["vocab"].items(), key=lambda kv: kv[1]):
        if piece not in vocab and len(vocab) < VOCAB_SIZE:
            vocab[piece] = len(vocab)
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in learned["merges"]]
    merges = [m for m in merges if m[0] in vocab and m[1] in vocab and m[0] + m[1] in vocab]
    tok = configure(Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", byte_fallback=True,
                                         fuse_unk=True)))
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    tok.post_processor = processors.TemplateProcessing(single="<bos> $A", pair="<bos> $A $B",
                                                       special_tokens=[("<bos>", BOS)])
    return tok


def _tokenizer_config() -> dict:
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<bos>", "eos_token": "<eos>", "pad_token": "<pad>", "unk_token": "<unk>",
        "additional_special_tokens": SPECIAL_TOKENS[4:],
        "add_bos_token": True, "add_eos_token": False, "clean_up_tokenization_spaces": False,
        "model_max_length": 4096, "padding_side": "left",
        "chat_template": CHAT_TEMPLATE.read_text(),
    }


def _model_config(vocab_size: int):
    from transformers import Gemma3Config

    text = dict(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                num_attention_heads=4, num_key_value_heads=2, head_dim=16, sliding_window=16,
                layer_types=["sliding_attention", "full_attention"] * 2, query_pre_attn_scalar=16,
                rope_scaling={"rope_type": "linear", "factor": 8.0}, rope_local_base_freq=10000.0,
                max_position_embeddings=4096, pad_token_id=PAD, bos_token_id=BOS, eos_token_id=[EOS, END_OF_TURN])
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                  image_size=224, patch_size=14, vision_use_head=False)
    return Gemma3Config(text_config=text, vision_config=vision, mm_tokens_per_image=MM_TOKENS_PER_IMAGE,
                        boi_token_index=START_OF_IMAGE, eoi_token_index=END_OF_IMAGE,
                        image_token_index=IMAGE_TOKEN, eos_token_id=[EOS, END_OF_TURN])


def _init_weights(model) -> None:
    """Random weights; the final norm scaled by -1 (Gemma multiplies by 1 + weight) so greedy decoding
    moves between tokens instead of copying its input, which random tied embeddings otherwise do."""
    import torch

    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("language_model.norm.weight"):
                p.fill_(-2.0)
            elif "norm" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
            else:
                p.copy_(torch.randn(p.shape, generator=gen) * (0.5 if "embed_tokens" in name else 0.15))


def make_tiny_gemma(out_dir: Path, *, force: bool = False) -> Path:
    """Write the checkpoint to `out_dir` (reused when a complete one of this version is there)."""
    out_dir = Path(out_dir)
    stamp = out_dir / ".tiny-gemma-version"
    if not force and stamp.exists() and stamp.read_text() == VERSION:
        return out_dir
    import torch
    from transformers import Gemma3ForConditionalGeneration

    tmp = out_dir.with_name(out_dir.name + ".partial")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    tokenizer = _train_tokenizer()
    tokenizer.save(str(tmp / "tokenizer.json"))
    (tmp / "tokenizer_config.json").write_text(json.dumps(_tokenizer_config(), indent=2) + "\n")
    (tmp / "special_tokens_map.json").write_text(json.dumps(
        {"bos_token": "<bos>", "eos_token": "<eos>", "pad_token": "<pad>", "unk_token": "<unk>"}, indent=2) + "\n")

    torch.manual_seed(0)
    config = _model_config(tokenizer.get_vocab_size())
    model = Gemma3ForConditionalGeneration(config).float().eval()
    _init_weights(model)
    model.save_pretrained(tmp, safe_serialization=True)
    (tmp / "generation_config.json").write_text(json.dumps(
        {"bos_token_id": BOS, "eos_token_id": [EOS, END_OF_TURN], "pad_token_id": PAD, "do_sample": False},
        indent=2) + "\n")
    (tmp / "preprocessor_config.json").write_text(json.dumps({
        "image_processor_type": "Gemma3ImageProcessor", "do_resize": True,
        "size": {"height": 224, "width": 224}, "resample": 2, "do_rescale": True, "rescale_factor": 1 / 255,
        "do_normalize": True, "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5],
        "do_convert_rgb": True}, indent=2) + "\n")
    (tmp / "README.md").write_text("Tiny random Gemma 3 made by gemma_serve.tiny_model. Its text is gibberish.\n")
    (tmp / ".tiny-gemma-version").write_text(VERSION)
    if out_dir.exists():
        shutil.rmtree(out_dir)
    tmp.rename(out_dir)
    return out_dir


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path)
    parser.add_argument("--force", action="store_true", help="rebuild even if a current copy exists")
    args = parser.parse_args(argv)
    print(make_tiny_gemma(args.out, force=args.force))
    return 0


if __name__ == "__main__":
    sys.exit(main())
