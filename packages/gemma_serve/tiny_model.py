"""A deterministic tiny Gemma 3 checkpoint in Hugging Face layout, for `make serve` and the tests.

It has the layout of google/gemma-3-4b-it, so anything that loads that model loads this one the same way:
`config.json` in the published style (Gemma3ForConditionalGeneration: a Gemma 3 text decoder with sliding
and full attention layers, a tiny SigLIP vision tower and the multimodal projector), `model.safetensors`
with the published tensor names (`language_model.model.*`, `vision_tower.vision_model.*`,
`multi_modal_projector.*`), `generation_config.json`, the image processor's `preprocessor_config.json` and
`processor_config.json`, and a real byte-fallback BPE tokenizer (`tokenizer.json`, `tokenizer_config.json`
with the Gemma chat template, also written as `chat_template.jinja` where processors look for it).
The weights are random (float32, under 1 MB): its text is gibberish.

Every file is byte-identical from run to run (fixed seeds, fixed corpus, no timestamps or versions).

    python -m gemma_serve.tiny_model OUT_DIR [--force]
    python -m gemma_serve make-tiny-model [OUT_DIR] [--force]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

# --- tokenizer ---------------------------------------------------------------------------------------
# Special tokens at fixed low ids: the same strings as Gemma's, at other ids (the real model has
# <start_of_turn> 105, <end_of_turn> 106, <start_of_image> 255999, <end_of_image> 256000, image 262144).
PAD, EOS, BOS, UNK, MASK = 0, 1, 2, 3, 4
START_OF_TURN, END_OF_TURN, START_OF_IMAGE, END_OF_IMAGE, IMAGE_TOKEN = 5, 6, 7, 8, 9
SPECIAL_TOKENS = ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>", "<start_of_turn>", "<end_of_turn>",
                  "<start_of_image>", "<end_of_image>", "<image_soft_token>"]  # index = id
# The 256 byte-fallback tokens <0x00>..<0xFF> follow at ids 10..265, then the alphabet and learned merges.
BYTE_TOKENS = [f"<0x{b:02X}>" for b in range(256)]
FIRST_BYTE_ID = len(SPECIAL_TOKENS)
VOCAB_SIZE = 640  # the tokenizer's size, and the model's vocab_size
# Characters that get a token of their own; every other character is spelt with byte tokens.
ALPHABET = ("▁\n\t" + "".join(chr(c) for c in range(0x21, 0x7F)) + "éèàçïüöñ—’“”")

# --- model -------------------------------------------------------------------------------------------
MM_TOKENS_PER_IMAGE = 64  # 16x16 SigLIP patches, average-pooled 2x2 -> 8x8 soft tokens per image
IMAGE_SIZE = 224
PATCH_SIZE = 14
MAX_POSITION_EMBEDDINGS = 2048
SEED = 0
# Bump when the weights change without any other file changing (the init scheme), so cached copies are
# rebuilt; it is stored in model.safetensors' metadata.
WEIGHTS_VERSION = "1"

CHAT_TEMPLATE = Path(__file__).with_name("chat_template.jinja")

# Files of a finished checkpoint (`make_tiny_gemma` reuses a folder that has exactly these, current).
FILES = ("chat_template.jinja", "config.json", "generation_config.json", "model.safetensors",
         "preprocessor_config.json", "processor_config.json", "tokenizer.json", "tokenizer_config.json")

# The tokenizer's training text: English prose, chat phrases, numbers and code, plus non-ASCII text.
# Merges are learned from it; accents outside ALPHABET, CJK and emoji go through byte fallback.
CORPUS = """\
The quick brown fox jumps over the lazy dog. The dog did not mind; it was asleep in the sun, and the
fox was already far away, running through the tall grass towards the river at the edge of the forest.

Once upon a time, in a small town by the sea, there lived an engineer who measured everything. She
measured the tides in the morning and the wind in the evening, and she wrote every number in a book.
One day the book was full, so she started another one, and then another, until the shelves were full.

A language model reads text as tokens and writes text one token at a time. To serve a model well, a
server batches the requests that arrive together, keeps the keys and values of every request in a
cache, and streams each new token to the user as soon as it is ready. When the cache is full, the
server waits, or it stops a request and starts it again later. The prompt is read once; the answer is
written token by token, and every token needs one more step of the model.

User: Hello! How are you today?
Model: I am well, thank you. How can I help you?
User: What is the capital of France?
Model: The capital of France is Paris. It is also the largest city in the country.
User: Write a short poem about the ocean, please.
Model: The waves come in, the waves go out; the gulls fly high and call about.
User: Can you explain how this works, step by step?
Model: Of course. First, the text is split into tokens. Then the model reads them and predicts the
next token. Finally, the new token is added to the text, and the model predicts the next one again.

The weather was cold in the morning and warm in the afternoon. People walked in the park, children
played near the water, and an old man read the newspaper on a bench while his dog watched the birds.
In the evening the lights of the city came on, one street after another, and the night was quiet.

Good software is tested. Each test checks one thing, runs quickly, and gives the same result every
time it runs. When a test fails, it should say what was expected and what happened instead, so that
the person who reads it can find the problem and fix it before the change is released to everyone.

You are a helpful assistant. Answer the question in one sentence. Be brief, be kind, and be clear.
Good morning, good afternoon, good evening and good night. Thank you very much, and see you soon!

Numbers appear in text too: 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 12, 16, 32, 42, 64, 100, 128, 256, 512,
1024, 2048 and 2026. So do symbols: (a + b) * c = d, x < y > z, [1, 2, 3], {"key": "value"}, 50% off,
$9.99, #hashtag, @user, a/b\\c, ~tilde, `code`, 'quotes' and "double quotes"; the end.

def greet(name):
    return f"Hello, {name}!"

for i in range(10):
    print(greet("world"), i)

Accents and other scripts: café, naïve, résumé, façade, über, señor, crème brûlée, Ångström, Zürich,
Москва, Αθήνα, 東京, 北京, こんにちは, 안녕하세요, नमस्ते, مرحبا — and emoji: 🦊 🚀 ✨ 👋 🙂 ❤️.
"""


# --- chat template -----------------------------------------------------------------------------------

def chat_template() -> str:
    """The Gemma 3 chat template (`chat_template.jinja` next to this module)."""
    return CHAT_TEMPLATE.read_text(encoding="utf-8")


# --- tokenizer ---------------------------------------------------------------------------------------

def _gemma_pipeline(tokenizer: Any) -> Any:
    """Gemma's text pipeline: spaces become "▁" (no pre-tokenizer), decoding undoes it and fuses bytes."""
    from tokenizers import decoders, normalizers

    tokenizer.normalizer = normalizers.Replace(" ", "▁")
    tokenizer.pre_tokenizer = None
    tokenizer.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(),
                                           decoders.Fuse()])
    return tokenizer


def build_tokenizer() -> Any:
    """The tiny model's `tokenizers.Tokenizer` (deterministic: the BPE trainer breaks ties by token ids)."""
    from tokenizers import AddedToken, Tokenizer, models, normalizers, pre_tokenizers, processors, trainers

    # 1. Learn merges within words ("▁word"), as sentencepiece does; the reserved tokens take ids 0..265.
    trainer_tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    trainer_tok.normalizer = normalizers.Replace(" ", "▁")
    trainer_tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="never", split=True)
    trainer = trainers.BpeTrainer(vocab_size=VOCAB_SIZE, min_frequency=2, show_progress=False,
                                  special_tokens=SPECIAL_TOKENS + BYTE_TOKENS,
                                  initial_alphabet=list(ALPHABET), limit_alphabet=len(ALPHABET))
    trainer_tok.train_from_iterator([CORPUS], trainer)
    learned = json.loads(trainer_tok.to_str())["model"]
    vocab = dict(sorted(learned["vocab"].items(), key=lambda kv: kv[1]))
    for token_id, token in enumerate(SPECIAL_TOKENS + BYTE_TOKENS):
        if vocab.get(token) != token_id:
            raise RuntimeError(f"tokenizer training put {token} at {vocab.get(token)}, not {token_id}")
    if len(vocab) != VOCAB_SIZE:
        raise RuntimeError(f"the corpus gave {len(vocab)} tokens, not {VOCAB_SIZE}: lengthen CORPUS")
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in learned["merges"]]

    # 2. The tokenizer as Gemma's: the learned vocabulary and merges, no pre-tokenizer (merges never
    # cross a "▁" word start, so whole-text BPE gives the same pieces), byte fallback, and the special
    # tokens as added tokens; the byte tokens stay plain vocabulary entries.
    tokenizer = _gemma_pipeline(Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>",
                                                     byte_fallback=True, fuse_unk=True)))
    tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<bos>:0 $A:0", pair="<bos>:0 $A:0 <bos>:1 $B:1", special_tokens=[("<bos>", BOS)])
    return tokenizer


def tokenizer_config() -> dict[str, Any]:
    """`tokenizer_config.json`: loads with transformers' GemmaTokenizer, as google/gemma-3-4b-it does."""
    added = {str(i): {"content": t, "lstrip": False, "normalized": False, "rstrip": False,
                      "single_word": False, "special": True} for i, t in enumerate(SPECIAL_TOKENS)}
    image_tokens = {"boi_token": "<start_of_image>", "eoi_token": "<end_of_image>",
                    "image_token": "<image_soft_token>"}
    return {
        "add_bos_token": True,
        "add_eos_token": False,
        "added_tokens_decoder": added,
        **image_tokens,
        "bos_token": "<bos>",
        "chat_template": chat_template(),
        "clean_up_tokenization_spaces": False,
        "eos_token": "<eos>",
        "extra_special_tokens": image_tokens,
        "mask_token": "<mask>",
        "model_max_length": MAX_POSITION_EMBEDDINGS,
        "pad_token": "<pad>",
        "padding_side": "left",
        "processor_class": "Gemma3Processor",
        "spaces_between_special_tokens": False,
        "tokenizer_class": "GemmaTokenizer",
        "unk_token": "<unk>",
        "use_default_system_prompt": False,
    }


# --- model config ------------------------------------------------------------------------------------

def model_config() -> dict[str, Any]:
    """`config.json`, in the published style of google/gemma-3-4b-it (readable by transformers 4 and 5)."""
    layers = 4
    sliding_window_pattern = 2  # every 2nd layer is a full-attention layer
    text = {
        "model_type": "gemma3_text",
        "vocab_size": VOCAB_SIZE,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": layers,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 16,
        "hidden_activation": "gelu_pytorch_tanh",
        "query_pre_attn_scalar": 16,
        "rms_norm_eps": 1e-06,
        "max_position_embeddings": MAX_POSITION_EMBEDDINGS,
        "sliding_window": 16,
        "sliding_window_pattern": sliding_window_pattern,
        "layer_types": ["sliding_attention" if (i + 1) % sliding_window_pattern else "full_attention"
                        for i in range(layers)],
        "rope_theta": 1000000.0,
        "rope_local_base_freq": 10000.0,
        "rope_scaling": {"rope_type": "linear", "factor": 8.0},
        "attn_logit_softcapping": None,
        "final_logit_softcapping": None,
        "attention_bias": False,
        "tie_word_embeddings": True,
        "pad_token_id": PAD,
        "bos_token_id": BOS,
        "eos_token_id": EOS,
    }
    vision = {
        "model_type": "siglip_vision_model",
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_attention_heads": 2,
        "num_hidden_layers": 1,
        "image_size": IMAGE_SIZE,
        "patch_size": PATCH_SIZE,
        "num_channels": 3,
        "hidden_act": "gelu_pytorch_tanh",
        "layer_norm_eps": 1e-06,
        "vision_use_head": False,
    }
    return {
        "architectures": ["Gemma3ForConditionalGeneration"],
        "model_type": "gemma3",
        "torch_dtype": "float32",
        "boi_token_index": START_OF_IMAGE,
        "eoi_token_index": END_OF_IMAGE,
        "image_token_index": IMAGE_TOKEN,
        "eos_token_id": [EOS, END_OF_TURN],
        "mm_tokens_per_image": MM_TOKENS_PER_IMAGE,
        "initializer_range": 0.02,
        "tie_word_embeddings": True,
        "text_config": text,
        "vision_config": vision,
    }


def generation_config() -> dict[str, Any]:
    return {"bos_token_id": BOS, "eos_token_id": [EOS, END_OF_TURN], "pad_token_id": PAD}


def preprocessor_config() -> dict[str, Any]:
    return {
        "image_processor_type": "Gemma3ImageProcessor",
        "processor_class": "Gemma3Processor",
        "do_convert_rgb": None,
        "do_resize": True,
        "size": {"height": IMAGE_SIZE, "width": IMAGE_SIZE},
        "resample": 2,  # bilinear
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "image_mean": [0.5, 0.5, 0.5],
        "image_std": [0.5, 0.5, 0.5],
        "do_pan_and_scan": None,
        "pan_and_scan_max_num_crops": None,
        "pan_and_scan_min_crop_size": None,
        "pan_and_scan_min_ratio_to_activate": None,
        "image_seq_length": MM_TOKENS_PER_IMAGE,
    }


def processor_config() -> dict[str, Any]:
    return {"image_seq_length": MM_TOKENS_PER_IMAGE, "processor_class": "Gemma3Processor"}


def _json_bytes(obj: dict[str, Any]) -> bytes:
    return (json.dumps(obj, indent=2, ensure_ascii=False) + "\n").encode("utf-8")


def _small_files() -> dict[str, bytes]:
    """Every file but the weights (cheap: no torch)."""
    return {
        # The template also as its own file, where processors (and transformers 5) look for it.
        "chat_template.jinja": chat_template().encode("utf-8"),
        "config.json": _json_bytes(model_config()),
        "generation_config.json": _json_bytes(generation_config()),
        "preprocessor_config.json": _json_bytes(preprocessor_config()),
        "processor_config.json": _json_bytes(processor_config()),
        "tokenizer.json": (build_tokenizer().to_str(pretty=True) + "\n").encode("utf-8"),
        "tokenizer_config.json": _json_bytes(tokenizer_config()),
    }


# --- weights -----------------------------------------------------------------------------------------

# transformers 5's module names -> the tensor names google/gemma-3-4b-it is published with.
_PUBLISHED_NAMES = (("model.language_model.", "language_model.model."),
                    ("model.vision_tower.", "vision_tower.vision_model."),
                    ("model.multi_modal_projector.", "multi_modal_projector."))


def _init_weights(model: Any) -> None:
    """Seeded random weights, independent of transformers' own init scheme, tuned so that greedy text
    varies: a random Gemma with tied embeddings mostly repeats its input token, so the final norm is -2
    (Gemma scales by 1 + weight, so by -1) and the embeddings are small next to the layers' outputs.
    Byte and non-stop special tokens get shorter embedding rows, so sampled text is mostly word pieces
    (<eos> and <end_of_turn> keep theirs: generation can end on its own now and then)."""
    import torch

    gen = torch.Generator().manual_seed(SEED)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("language_model.norm.weight"):
                p.fill_(-2.0)
            elif ".vision_tower." in name and ("layer_norm" in name or "layernorm" in name):
                base = 1.0 if name.endswith(".weight") else 0.0  # LayerNorm: scale 1, shift 0
                p.copy_(base + torch.randn(p.shape, generator=gen) * 0.1)
            elif "norm" in name:  # Gemma RMSNorm: scale 1 + weight
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
            elif name.endswith(".bias"):
                p.copy_(torch.randn(p.shape, generator=gen) * 0.02)
            elif name.endswith("embed_tokens.weight"):
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
                quiet = [i for i in range(FIRST_BYTE_ID + len(BYTE_TOKENS)) if i not in (EOS, END_OF_TURN)]
                p[quiet] *= 0.5
            else:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.3)


def _published_state_dict(model: Any) -> dict[str, Any]:
    tensors = {}
    for name, tensor in model.state_dict().items():
        if name == "lm_head.weight":  # tied to the embeddings, not stored (as published)
            continue
        for ours, published in _PUBLISHED_NAMES:
            if name.startswith(ours):
                name = published + name[len(ours):]
                break
        else:
            raise RuntimeError(f"unexpected tensor {name}")
        tensors[name] = tensor.detach().to(dtype=tensor.dtype).contiguous().clone()
    return dict(sorted(tensors.items()))


def _write_weights(folder: Path) -> None:
    import torch
    from safetensors.torch import save_file
    from transformers import AutoConfig, Gemma3ForConditionalGeneration

    torch.manual_seed(SEED)
    config = AutoConfig.from_pretrained(str(folder))  # exactly what loaders will read back
    model = Gemma3ForConditionalGeneration(config).to(torch.float32).eval()
    _init_weights(model)
    path = folder / "model.safetensors"
    save_file(_published_state_dict(model), str(path), metadata={"format": "pt", "tiny_gemma_weights": WEIGHTS_VERSION})
    _sort_safetensors_metadata(path)


def _sort_safetensors_metadata(path: Path) -> None:
    """safetensors writes its metadata map in hash order, which differs between processes: sort it."""
    with path.open("r+b") as f:
        size = int.from_bytes(f.read(8), "little")
        raw = f.read(size)
        header = json.loads(raw)
        header["__metadata__"] = dict(sorted(header["__metadata__"].items()))
        canonical = json.dumps(header, separators=(",", ":")).encode("utf-8")
        if len(canonical) != len(raw.rstrip(b" ")):
            raise RuntimeError("unexpected safetensors header layout")
        f.seek(8)
        f.write(canonical)


# --- entry points ------------------------------------------------------------------------------------

def _safetensors_metadata(path: Path) -> dict[str, str]:
    try:
        with path.open("rb") as f:
            size = int.from_bytes(f.read(8), "little")
            if not 0 < size < 2**24:
                return {}
            return json.loads(f.read(size)).get("__metadata__") or {}
    except (OSError, ValueError):
        return {}


def _is_current(out_dir: Path, small: dict[str, bytes]) -> bool:
    metadata = _safetensors_metadata(out_dir / "model.safetensors")
    if metadata.get("tiny_gemma_weights") != WEIGHTS_VERSION:
        return False
    for name, data in small.items():
        try:
            if (out_dir / name).read_bytes() != data:
                return False
        except OSError:
            return False
    return True


# Files earlier versions of this generator wrote; a folder holding them is still ours to replace.
_OLD_FILES = ("README.md", "special_tokens_map.json", ".tiny-gemma-version")


def _replaceable(out_dir: Path) -> bool:
    """Only a small folder holding nothing but (this or an earlier) tiny checkpoint's files is deleted."""
    if not out_dir.is_dir():
        return False
    entries = list(out_dir.iterdir())
    return (all(p.is_file() and not p.is_symlink() and p.name in FILES + _OLD_FILES for p in entries)
            and sum(p.stat().st_size for p in entries) < 64 * 2**20)


def make_tiny_gemma(out_dir: Path, *, force: bool = False) -> Path:
    """Write the tiny Gemma 3 checkpoint into `out_dir` and return it.

    An existing, current checkpoint there is reused unless `force`; a stale one (other files than this
    code writes now) is rebuilt. The folder is written beside `out_dir` and moved into place, so a
    reader never sees half a checkpoint. Refuses to replace a folder that holds anything else."""
    out_dir = Path(out_dir).expanduser().resolve()
    small = _small_files()
    if not force and _is_current(out_dir, small):
        return out_dir
    if out_dir.exists() and not _replaceable(out_dir):
        raise FileExistsError(f"{out_dir} exists and is not a tiny Gemma checkpoint; choose another folder")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        for name, data in small.items():
            (tmp / name).write_bytes(data)
        _write_weights(tmp)
        for path in tmp.iterdir():
            path.chmod(0o644)
        tmp.chmod(0o755)
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if out_dir.is_dir() and _is_current(out_dir, small):  # another process finished first
            return out_dir
        raise
    return out_dir


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m gemma_serve.tiny_model", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out_dir", type=Path, help="folder to write the checkpoint into")
    parser.add_argument("--force", action="store_true", help="rewrite it even if a current one is there")
    args = parser.parse_args(argv)
    print(make_tiny_gemma(args.out_dir, force=args.force))
    return 0


if __name__ == "__main__":
    sys.exit(main())
