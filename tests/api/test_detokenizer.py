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


def test_random_texts_stream_exactly_at_random_chunkings(tiny_tokenizer):
    """Any text the tokenizer can encode comes back exactly, whatever the chunking, with no partial
    character ever emitted. (Byte sequences that form no character at all, which a model could emit,
    decode to U+FFFD, and how many depends on the window: the same caveat as any windowed detokenizer.)"""
    rng = random.Random(1)
    pool = list("abcdefghij klmnop.,!?\n") + list("éüñçàø") + list("東京北こんに") + ["🦊", "🚀", "✨", "𝔘"]
    for _ in range(30):
        text = "".join(rng.choice(pool) for _ in range(rng.randint(1, 30)))
        ids = tiny_tokenizer.encode_prompt(text)
        deltas = stream(tiny_tokenizer, ids, [rng.randint(1, 4) for _ in ids])
        assert "".join(deltas) == text
        assert all(REPLACEMENT not in d for d in deltas)


def test_multibyte_characters_split_over_byte_tokens_come_out_whole(tiny_tokenizer):
    hf = tiny_tokenizer.hf
    for char in ["é", "東", "🦊"]:
        ids = [hf.convert_tokens_to_ids(f"<0x{b:02X}>") for b in char.encode("utf-8")]
        deltas = stream(tiny_tokenizer, ids, [1] * len(ids))
        assert [d for d in deltas if d] == [char]
