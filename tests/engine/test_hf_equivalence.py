"""The engine computes what Hugging Face transformers computes: same weights -> same logits (float32,
relative error < 1e-4) and token-identical greedy generation, for Gemma 1, 2 and 3."""

import pytest
import torch
from gemma_serve.engine.sampling_params import SamplingParams
from gemma_serve.engine.scheduler import ScheduledChunk
from gemma_serve.engine.sequence import Sequence

from .conftest import engine_for, prompt

GENERATIONS = ["gemma1", "gemma2", "gemma3", "gemma3_mm"]


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def engine_logits(engine, prompt: list[int], chunk: int) -> torch.Tensor:
    """Logits at every prompt position, computing the prompt in chunks through the paged cache (the
    runner's own batch preparation; chunk 1 is the decode path). Blocks as the scheduler gives them:
    the sliding-window layers' pool gives back the blocks older than the window chunk by chunk."""
    runner = engine.runner
    seq = Sequence("probe", prompt, SamplingParams(max_tokens=1), 0)
    bm = engine.block_manager
    caching, bm.prefix_caching = bm.prefix_caching, False  # every position computed, none from the cache
    bm.allocate(seq)
    bm.prefix_caching = caching
    rows = []
    for start in range(0, len(prompt), chunk):
        n = min(chunk, len(prompt) - start)
        seq.num_computed_tokens = start
        engine.block_manager.grow(seq, start + n)
        inputs = runner.prepare([ScheduledChunk(seq, start, n)])
        with torch.inference_mode():
            rows.append(runner.model(inputs.input_ids, inputs.positions, runner.kv_caches, inputs.meta,
                                     torch.arange(n)))
    engine.block_manager.free_blocks(seq)
    return torch.cat(rows).cpu()


def hf_logits(model, prompt: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([prompt])).logits[0].float()


@pytest.mark.parametrize("generation", GENERATIONS)
@pytest.mark.parametrize("chunk", [64, 7, 1])  # whole prompt, chunked prefill, token by token (decode)
def test_logits_match_transformers(checkpoints, generation, chunk):
    folder, model = checkpoints[generation]
    engine = engine_for(folder)
    prompt = torch.randint(5, 300, (37,), generator=torch.Generator().manual_seed(1)).tolist()
    ours = engine_logits(engine, prompt, chunk)
    ref = hf_logits(model, prompt)
    assert ours.shape == ref.shape
    assert rel_err(ours, ref) < 1e-4


@pytest.mark.parametrize("generation", GENERATIONS)
def test_greedy_32_tokens_identical_to_generate(checkpoints, generation):
    folder, model = checkpoints[generation]
    engine = engine_for(folder, max_num_batched_tokens=16)  # chunked prefill, then decodes
    prompt = torch.randint(5, 300, (21,), generator=torch.Generator().manual_seed(2)).tolist()
    ours = engine.generate([prompt], SamplingParams(max_tokens=32, temperature=0))[0]
    with torch.no_grad():
        ref = model.generate(torch.tensor([prompt]), max_new_tokens=32, min_new_tokens=32, do_sample=False,
                             eos_token_id=None, pad_token_id=0)[0, len(prompt):].tolist()
    assert ours == ref
    assert len(set(ours)) > 3, "degenerate test model: greedy repeats one token"


@pytest.mark.parametrize("generation", ["gemma2", "gemma3"])
def test_one_step_mixing_decode_prompt_and_chunk_matches_transformers(checkpoints, generation):
    """A decode, a whole prompt and the last chunk of a prompt started earlier, in one flattened
    step: each sampled row's logits equal transformers' at that sequence's last position."""
    folder, model = checkpoints[generation]
    engine = engine_for(folder)
    runner, bm = engine.runner, engine.block_manager
    a = Sequence("a", prompt(10, 30), SamplingParams(), 0)
    b = Sequence("b", prompt(11, 13), SamplingParams(), 1)
    c = Sequence("c", prompt(12, 19), SamplingParams(), 2)
    for seq in (a, b, c):
        bm.allocate(seq)
    with torch.inference_mode():
        for seq, n in ((a, 30), (c, 10)):  # earlier steps: all of a's prompt, the start of c's
            bm.grow(seq, n)  # as the scheduler does (the window pool's blocks come chunk by chunk)
            inputs = runner.prepare([ScheduledChunk(seq, 0, n)])
            runner.model(inputs.input_ids, inputs.positions, runner.kv_caches, inputs.meta, inputs.logits_indices)
            seq.num_computed_tokens = n
        a.token_ids.append(77)  # as if sampled: a now decodes
        bm.grow(a, a.num_tokens)
        bm.grow(c, 19)
        bm.grow(b, 13)
        chunks = [ScheduledChunk(c, 10, 9), ScheduledChunk(a, 30, 1), ScheduledChunk(b, 0, 13)]
        inputs = runner.prepare(chunks)
        assert inputs.meta.num_decodes == 1 and inputs.sampling_seqs == [c, a, b]
        ours = runner.model(inputs.input_ids, inputs.positions, runner.kv_caches, inputs.meta, inputs.logits_indices)
    for row, seq in enumerate((c, a, b)):
        ref = hf_logits(model, seq.token_ids)[-1]
        assert rel_err(ours[row].cpu(), ref) < 1e-4, seq.request_id
