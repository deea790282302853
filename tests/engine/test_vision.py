"""Gemma 3 images in the engine, checked against transformers' Gemma3ForConditionalGeneration on the
repo's tiny checkpoint (SigLIP 224 px, 14 px patches, 64 soft tokens per image, sliding window 16, so
an image run is longer than the window): same logits at every prefill position, same greedy text,
image-aware prefix caching, a feature cache, chunked prefill that never cuts an image, clear errors."""

import asyncio
import hashlib
import json
import shutil

import numpy as np
import pytest
import torch
from gemma_serve import tiny_model as tiny
from gemma_serve.engine.async_engine import AsyncEngine
from gemma_serve.engine.block_manager import block_hash
from gemma_serve.engine.multimodal import FeatureCache, ImageInput, image_runs
from gemma_serve.engine.sampling_params import SamplingParams
from gemma_serve.engine.scheduler import ScheduledChunk, fit_image_runs
from gemma_serve.engine.sequence import Sequence

from .conftest import engine_for

TOKENS = tiny.MM_TOKENS_PER_IMAGE
GREEDY = SamplingParams(max_tokens=24, temperature=0.0, stop_token_ids=())


def image(seed: int) -> ImageInput:
    pixels = np.random.default_rng(seed).uniform(-1, 1, (3, tiny.IMAGE_SIZE, tiny.IMAGE_SIZE)).astype(np.float32)
    return ImageInput(pixels, hashlib.sha256(pixels.tobytes()).hexdigest())


def text(seed: int, n: int) -> list[int]:
    """Word-piece ids of the tiny vocabulary (no special or image ids)."""
    return np.random.default_rng(seed).integers(tiny.FIRST_BYTE_ID, tiny.VOCAB_SIZE, n).tolist()


def image_ids() -> list[int]:
    """One image as the API layer writes it (Gemma3Processor's full image sequence)."""
    return [tiny.START_OF_IMAGE] + [tiny.IMAGE_TOKEN] * TOKENS + [tiny.END_OF_IMAGE]


def prompt(*parts) -> list[int]:
    """[BOS] + parts, each a list of text ids or "image"."""
    ids = [tiny.BOS]
    for part in parts:
        ids += image_ids() if part == "image" else part
    return ids


ONE_IMAGE = prompt(text(1, 11), "image", text(2, 9))  # image tokens at 13..76 of 87
TWO_IMAGES = prompt(text(3, 5), "image", text(4, 7), "image", text(5, 4))


@pytest.fixture(scope="module")
def hf_model(tiny_model_dir):
    from transformers import Gemma3ForConditionalGeneration

    return Gemma3ForConditionalGeneration.from_pretrained(str(tiny_model_dir), attn_implementation="eager").float().eval()


def hf_inputs(ids: list[int], images: list[ImageInput]) -> dict:
    input_ids = torch.tensor([ids])
    return dict(input_ids=input_ids, pixel_values=torch.stack([torch.as_tensor(i.pixel_values) for i in images]),
                # As Gemma3Processor: 1 marks image soft tokens, which attend to their image bidirectionally.
                token_type_ids=(input_ids == tiny.IMAGE_TOKEN).long())


def hf_logits(model, ids, images) -> torch.Tensor:
    with torch.no_grad():
        return model(**hf_inputs(ids, images)).logits[0].float()


def hf_greedy(model, ids, images, n: int) -> list[int]:
    with torch.no_grad():
        out = model.generate(**hf_inputs(ids, images), max_new_tokens=n, min_new_tokens=n, do_sample=False,
                             eos_token_id=None, pad_token_id=0)
    return out[0, len(ids):].tolist()


def engine_logits(engine, ids, images, chunks: list[int]) -> torch.Tensor:
    """Logits at every prompt position, computing the prompt in the given chunk lengths."""
    runner = engine.runner
    seq = Sequence("probe", ids, SamplingParams(max_tokens=1), 0,
                   engine._image_spans(ids, SamplingParams(max_tokens=1), images))
    bm = engine.block_manager
    caching, bm.prefix_caching = bm.prefix_caching, False  # every position computed, none from the cache
    bm.allocate(seq)
    bm.prefix_caching = caching
    rows, start = [], 0
    with torch.inference_mode():
        for n in chunks:
            seq.num_computed_tokens = start
            engine.block_manager.grow(seq, start + n)  # as the scheduler does (window pool: chunk by chunk)
            inputs = runner.prepare([ScheduledChunk(seq, start, n)])
            rows.append(runner.model(inputs.input_ids, inputs.positions, runner.kv_caches, inputs.meta,
                                     torch.arange(n), runner.embed_images(inputs), inputs.image_rows))
            start += n
    engine.block_manager.free_blocks(seq)
    assert start == len(ids)
    return torch.cat(rows).cpu()


def tiny_engine(folder, **overrides):
    return engine_for(folder, **{"max_num_batched_tokens": 256, **overrides})


# --- transformers equivalence ------------------------------------------------------------------------

@pytest.mark.parametrize("case", ["one_image", "two_images"])
def test_prefill_logits_match_transformers_at_every_position(tiny_model_dir, hf_model, case):
    ids, images = (ONE_IMAGE, [image(1)]) if case == "one_image" else (TWO_IMAGES, [image(2), image(3)])
    ref = hf_logits(hf_model, ids, images)
    engine = tiny_engine(tiny_model_dir)
    torch.testing.assert_close(engine_logits(engine, ids, images, [len(ids)]), ref, atol=1e-4, rtol=1e-4)
    # Chunks that end before, at and after image runs (never inside one): the same logits.
    runs = image_runs(ids, tiny.IMAGE_TOKEN)
    cut = runs[0][0]
    chunks = [cut, runs[0][1] - cut + 3, len(ids) - runs[0][1] - 3]
    torch.testing.assert_close(engine_logits(engine, ids, images, chunks), ref, atol=1e-4, rtol=1e-4)


def test_image_tokens_attend_bidirectionally(tiny_model_dir, hf_model):
    """The reference with a causal-only mask differs: the test above does check the image mask."""
    images = [image(1)]
    with torch.no_grad():
        causal = hf_model(input_ids=torch.tensor([ONE_IMAGE]),
                          pixel_values=torch.as_tensor(images[0].pixel_values)[None]).logits[0]
    ours = engine_logits(tiny_engine(tiny_model_dir), ONE_IMAGE, images, [len(ONE_IMAGE)])
    assert (ours - causal).abs().max() > 1e-2


def test_vision_encoder_matches_transformers(tiny_model_dir, hf_model):
    pixels = torch.stack([torch.as_tensor(image(s).pixel_values) for s in (1, 2)])
    with torch.no_grad():
        ref = hf_model.model.get_image_features(pixels, return_dict=True).pooler_output
    ours = tiny_engine(tiny_model_dir).runner.vision.encode(pixels).cpu()
    assert ours.shape == (2, TOKENS, 64)
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("case", ["one_image", "two_images"])
def test_greedy_continuation_identical_to_generate(tiny_model_dir, hf_model, case):
    ids, images = (ONE_IMAGE, [image(1)]) if case == "one_image" else (TWO_IMAGES, [image(2), image(3)])
    ours = tiny_engine(tiny_model_dir).generate([ids], GREEDY, images=[images])[0]
    assert ours == hf_greedy(hf_model, ids, images, GREEDY.max_tokens)
    assert len(set(ours)) > 3, "degenerate test model: greedy repeats one token"


def test_batch_mixing_image_and_text_requests(tiny_model_dir, hf_model):
    """Two image prompts and a text prompt in the same steps, images of both encoded in one batch."""
    engine = tiny_engine(tiny_model_dir, max_num_batched_tokens=512)
    plain = prompt(text(9, 20))
    outs = engine.generate([ONE_IMAGE, plain, TWO_IMAGES], GREEDY, images=[[image(1)], None, [image(2), image(3)]])
    assert outs[0] == hf_greedy(hf_model, ONE_IMAGE, [image(1)], GREEDY.max_tokens)
    assert outs[2] == hf_greedy(hf_model, TWO_IMAGES, [image(2), image(3)], GREEDY.max_tokens)
    with torch.no_grad():
        ref = hf_model.generate(torch.tensor([plain]), max_new_tokens=24, min_new_tokens=24, do_sample=False,
                                eos_token_id=None, pad_token_id=0)[0, len(plain):].tolist()
    assert outs[1] == ref
    assert engine.runner.vision.num_encoded == 3


# --- caches ------------------------------------------------------------------------------------------

def test_block_hashes_include_the_images():
    """Same ids, other image: the blocks holding (or following) image tokens hash differently; the
    text blocks before the image are shared."""
    from gemma_serve.engine.block_manager import BlockManager
    from gemma_serve.engine.multimodal import ImageSpan

    ids = ONE_IMAGE
    start, end = image_runs(ids, tiny.IMAGE_TOKEN)[0]

    def hashes(img: ImageInput) -> list[bytes]:
        bm = BlockManager(64, 4)
        seq = Sequence("s", ids, SamplingParams(), 0, [ImageSpan(start, end, img)])
        bm.allocate(seq)
        seq.num_computed_tokens = len(ids)
        bm.register_computed(seq)
        return seq.block_hashes

    a, b, a2 = hashes(image(1)), hashes(image(2)), hashes(image(1))
    assert a == a2 and len(a) == len(ids) // 4
    first_image_block = start // 4
    assert a[:first_image_block] == b[:first_image_block]
    assert all(x != y for x, y in zip(a[first_image_block:], b[first_image_block:]))
    assert a[first_image_block] != block_hash(a[first_image_block - 1], ids[start // 4 * 4:start // 4 * 4 + 4])


def test_different_images_never_share_kv_blocks(tiny_model_dir, hf_model):
    engine = tiny_engine(tiny_model_dir)
    first_image_block_start = image_runs(ONE_IMAGE, tiny.IMAGE_TOKEN)[0][0] // 4 * 4
    out_a = engine.generate([ONE_IMAGE], GREEDY, images=[[image(1)]])[0]
    engine.add_request("b", ONE_IMAGE, GREEDY, images=[image(2)])
    seq_b = engine.sequences["b"]
    out_b = []
    while engine.has_unfinished():
        for out in engine.step():
            out_b += out.new_token_ids
        if seq_b.num_cached_tokens:
            # Only the text blocks before the image came from A's cache.
            assert seq_b.num_cached_tokens == first_image_block_start
    assert seq_b.num_cached_tokens == first_image_block_start
    assert out_a == hf_greedy(hf_model, ONE_IMAGE, [image(1)], GREEDY.max_tokens)
    assert out_b == hf_greedy(hf_model, ONE_IMAGE, [image(2)], GREEDY.max_tokens)
    assert out_a != out_b


def test_same_image_hits_the_prefix_cache_and_is_encoded_once(tiny_model_dir, hf_model):
    engine = tiny_engine(tiny_model_dir)
    ref = hf_greedy(hf_model, ONE_IMAGE, [image(1)], GREEDY.max_tokens)
    assert engine.generate([ONE_IMAGE], GREEDY, images=[[image(1)]])[0] == ref
    engine.add_request("again", ONE_IMAGE, GREEDY, images=[image(1)])
    seq = engine.sequences["again"]
    out = []
    while engine.has_unfinished():
        for delta in engine.step():
            out += delta.new_token_ids
    assert out == ref
    assert seq.num_cached_tokens == (len(ONE_IMAGE) - 1) // 4 * 4  # every full block, image ones included
    assert engine.runner.vision.num_encoded == 1

    # Other text before the same image: no prefix hit past the text, but the features are cached.
    other = prompt(text(7, 6), "image", text(2, 9))
    hits = engine.runner.feature_cache.hits
    assert engine.generate([other], GREEDY, images=[[image(1)]])[0] == hf_greedy(hf_model, other, [image(1)], 24)
    assert engine.runner.vision.num_encoded == 1 and engine.runner.feature_cache.hits == hits + 1
    assert engine.stats().extra["num_images_encoded"] == 1


def test_prefix_hit_ending_inside_an_image_resumes_correctly(tiny_model_dir, hf_model):
    """When only the first blocks of an image are still cached, the rest of its run is computed in one
    chunk against them, with the image's cached features: same logits as transformers."""
    engine = tiny_engine(tiny_model_dir, max_num_batched_tokens=64)
    ids, images = ONE_IMAGE, [image(1)]
    engine.generate([ids], SamplingParams(max_tokens=1), images=[images])
    start, end = image_runs(ids, tiny.IMAGE_TOKEN)[0]
    # Forget the cached blocks from the middle of the image on (as if evicted).
    keep = (start + 20) // 4
    bm = engine.block_manager
    seq_probe = Sequence("x", ids, SamplingParams(), 0, engine._image_spans(ids, SamplingParams(), images))
    bm.allocate(seq_probe)
    evict = {h: b for h, b in bm.pool.cached.items() if b in seq_probe.block_table[keep:]}
    bm.free_blocks(seq_probe)
    for h in evict:
        del bm.pool.cached[h]
    engine.add_request("resume", ids, GREEDY, images=images)
    seq = engine.sequences["resume"]
    chunks = []
    schedule = engine.scheduler.schedule

    def recording_schedule():
        out = schedule()
        chunks.extend((c.seq.request_id, c.start, c.num_tokens) for c in out)
        return out

    engine.scheduler.schedule = recording_schedule
    out = []
    while engine.has_unfinished():
        for delta in engine.step():
            out += delta.new_token_ids
    assert seq.num_cached_tokens == keep * 4 and start < keep * 4 < end
    # The rest of the prompt from the middle of the image, in one chunk.
    assert chunks[0] == ("resume", keep * 4, len(ids) - keep * 4)
    assert out == hf_greedy(hf_model, ids, images, GREEDY.max_tokens)
    assert engine.runner.vision.num_encoded == 1


def test_feature_cache_is_bounded_by_count_and_bytes():
    cache = FeatureCache(max_entries=2, max_bytes=3 * 64 * 4)
    for name in "abc":
        cache.put(name, torch.zeros(64))
    assert len(cache) == 2 and "a" not in cache and cache.get("b") is not None
    cache.put("d", torch.zeros(64))  # b was used last: c goes
    assert "c" not in cache and "b" in cache and "d" in cache
    cache.put("big", torch.zeros(2 * 64))  # 1 + 2 entries would exceed the bytes
    assert "big" in cache and cache.nbytes <= 3 * 64 * 4 and len(cache) == 2
    cache.put("huge", torch.zeros(4 * 64))  # larger than the whole cache: not kept
    assert "huge" not in cache


# --- chunked prefill -----------------------------------------------------------------------------

def test_chunk_budget_smaller_than_prompt_never_splits_an_image(tiny_model_dir, hf_model):
    images = [image(2), image(3)]
    ids = TWO_IMAGES
    runs = image_runs(ids, tiny.IMAGE_TOKEN)
    engine = tiny_engine(tiny_model_dir, max_num_batched_tokens=70)
    chunks = []
    schedule = engine.scheduler.schedule

    def recording_schedule():
        out = schedule()
        chunks.extend((c.start, c.start + c.num_tokens) for c in out if c.num_tokens > 1)
        return out

    engine.scheduler.schedule = recording_schedule
    out = engine.generate([ids], GREEDY, images=[images])[0]
    assert len(chunks) >= 3, chunks  # the prompt took several steps
    for start, end in chunks:
        assert end - start <= 70
        for a, b in runs:
            assert not (a < end < b) and not (a < start < b), (start, end, runs)
    assert out == hf_greedy(hf_model, ids, images, GREEDY.max_tokens)
    # The logits of every position, computed in those same chunks.
    torch.testing.assert_close(engine_logits(engine, ids, images, [b - a for a, b in chunks]),
                               hf_logits(hf_model, ids, images), atol=1e-4, rtol=1e-4)


def test_fit_image_runs():
    from gemma_serve.engine.multimodal import ImageSpan

    seq = Sequence("s", [0] * 100, SamplingParams(), 0, [ImageSpan(10, 74, image(1))])
    assert fit_image_runs(seq, 0, 10) == 10  # ends where the run starts
    assert fit_image_runs(seq, 0, 50) == 10  # would end inside: ends before it
    assert fit_image_runs(seq, 0, 74) == 74
    assert fit_image_runs(seq, 10, 40) == 0  # starts at the run, the run does not fit
    assert fit_image_runs(seq, 30, 43) == 0  # starts inside (prefix hit), the rest does not fit
    assert fit_image_runs(seq, 30, 44) == 44
    assert fit_image_runs(seq, 74, 5) == 5


# --- errors --------------------------------------------------------------------------------------

def test_request_errors_are_clear_value_errors(tiny_model_dir, checkpoints):
    engine = tiny_engine(tiny_model_dir)
    p = SamplingParams(max_tokens=4)
    with pytest.raises(ValueError, match="1 image token run.*for 0 image"):
        engine.add_request("a", ONE_IMAGE, p)
    with pytest.raises(ValueError, match="2 image token run.*for 1 image"):
        engine.add_request("b", TWO_IMAGES, p, images=[image(1)])
    with pytest.raises(ValueError, match="0 image token run.*for 1 image"):
        engine.check_request(prompt(text(1, 5)), p, images=[image(1)])
    short = prompt(text(1, 3), [tiny.START_OF_IMAGE] + [tiny.IMAGE_TOKEN] * 10 + [tiny.END_OF_IMAGE])
    with pytest.raises(ValueError, match="has 10 image tokens; this model reads 64"):
        engine.add_request("c", short, p, images=[image(1)])
    bad = ImageInput(np.zeros((3, 32, 32), np.float32), "abc")
    with pytest.raises(ValueError, match=r"shape \(3, 32, 32\), expected \(3, 224, 224\)"):
        engine.add_request("d", ONE_IMAGE, p, images=[bad])
    with pytest.raises(ValueError, match="64 tokens, more than the engine's max_num_batched_tokens \\(32\\)"):
        tiny_engine(tiny_model_dir, max_num_batched_tokens=32).add_request("e", ONE_IMAGE, p, images=[image(1)])
    assert not engine.sequences and not engine.has_unfinished()

    text_only = engine_for(checkpoints["gemma3"][0])
    assert not text_only.supports_images and text_only.mm_tokens_per_image is None
    assert text_only.image_token_id is None and text_only.boi_token_id is None and text_only.eoi_token_id is None
    with pytest.raises(ValueError, match="no vision tower"):
        text_only.add_request("f", [2, 5, 6], p, images=[image(1)])
    text_only.add_request("g", [2, 5, 6], p, images=[])  # no images: fine

    async def via_async():
        front = AsyncEngine(engine)
        with pytest.raises(ValueError, match="for 0 image"):
            front.add_request("h", ONE_IMAGE, p)
        front.start()
        try:
            outs = [o async for o in front.add_request("i", ONE_IMAGE, p, images=[image(1)])]
        finally:
            front.shutdown()
        return outs

    outs = asyncio.run(via_async())
    assert outs[-1].finished and sum(len(o.new_token_ids) for o in outs) == 4


def test_engine_properties(tiny_model_dir):
    engine = tiny_engine(tiny_model_dir)
    assert engine.supports_images and engine.mm_tokens_per_image == TOKENS
    assert (engine.image_token_id, engine.boi_token_id, engine.eoi_token_id) == (
        tiny.IMAGE_TOKEN, tiny.START_OF_IMAGE, tiny.END_OF_IMAGE)


def test_random_load_format_builds_the_vision_tower(tiny_model_dir, tmp_path):
    """Benchmarks: real-shape random weights from config.json alone, vision included."""
    shutil.copy(tiny_model_dir / "config.json", tmp_path / "config.json")
    engine = engine_for(tmp_path, load_format="random", max_num_batched_tokens=256)
    assert engine.supports_images
    features = engine.runner.vision.encode(torch.as_tensor(image(1).pixel_values)[None])
    assert features.shape == (1, TOKENS, json.loads((tmp_path / "config.json").read_text())["text_config"]["hidden_size"])
    assert torch.isfinite(features).all()
    out = engine.generate([ONE_IMAGE], SamplingParams(max_tokens=3, temperature=0.0), images=[[image(1)]])[0]
    assert len(out) == 3
