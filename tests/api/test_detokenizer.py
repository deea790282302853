import random

from gemma_serve.api.detokenizer import REPLACEMENT, IncrementalDetokenizer

TEXTS = [
    "Hello world, this is a test.",
    "café naïve — 東京 and emoji 🦊🚀 mixed in",
    "  leading spaces and\nnew lines\n\n",
    "numbers 1234567890 and symbols {}[]()<>",
]


def stream(tokenizer, ids, sizes):
    detok = IncrementalDetokenizer(tokenizer)
    deltas, i = [], 0
    for size in sizes:
        deltas.append(detok.push(ids[i:i + size]))
        i += size
        if i >= len(ids):
            break
    deltas.append(detok.flush())
    return deltas


def test_incremental_text_equals_full_decode_for_any_chunking(tiny_tokenizer):
    rng = random.Random(0)
    for text in TEXTS:
        ids = tiny_tokenizer.encode_prompt(text)
        expected = tiny_tokenizer.decode(ids)
        for _ in range(5):
            sizes = [rng.randint(1, 3) for _ in range(len(ids))]
            deltas = stream(tiny_tokenizer, ids, sizes)
            assert "".join(deltas) == expected
            assert all(REPLACEMENT not in d for d in deltas), "emitted half a character"


def test_random_token_ids_never_emit_a_broken_character(tiny_tokenizer):
    rng = random.Random(1)
    vocab = len(tiny_tokenizer.hf)
    for _ in range(20):
        ids = [rng.randrange(vocab) for _ in range(40)]
        for delta in stream(tiny_tokenizer, ids, [1] * len(ids)):
            delta.encode("utf-8")  # valid UTF-8
            assert REPLACEMENT not in delta
