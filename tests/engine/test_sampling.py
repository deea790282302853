"""Sampling: seeds, filters, penalties, stops and lengths."""

import math

import pytest
import torch
from gemma_serve.engine.sampler import _penalize, _top_k_top_p, sample
from gemma_serve.engine.sampling_params import SamplingParams
from gemma_serve.engine.sequence import Sequence

from .conftest import engine_for, prompt


def seq(tokens, n_prompt, **params) -> Sequence:
    s = Sequence("s", tokens[:n_prompt], SamplingParams(**params), 0)
    s.token_ids = list(tokens)
    return s


def test_same_seed_same_output_different_seed_different(checkpoints):
    folder, _ = checkpoints["gemma2"]
    engine = engine_for(folder)
    p = prompt(1, 10)
    a, b, c = engine.generate([p, p, p], [SamplingParams(max_tokens=20, temperature=1.0, seed=s) for s in (3, 3, 4)])
    assert a == b and a != c


def test_top_k_1_and_tiny_top_p_equal_greedy(checkpoints):
    folder, _ = checkpoints["gemma3"]
    engine = engine_for(folder)
    p = prompt(2, 9)
    greedy = engine.generate([p], SamplingParams(max_tokens=16, temperature=0.0))[0]
    assert engine.generate([p], SamplingParams(max_tokens=16, temperature=1.5, top_k=1, seed=1))[0] == greedy
    assert engine.generate([p], SamplingParams(max_tokens=16, temperature=1.5, top_p=1e-6, seed=2))[0] == greedy


def test_top_k_top_p_masks():
    logits = torch.tensor([[4.0, 3.0, 2.0, 1.0, 0.0]])
    kept = lambda out: (out > float("-inf")).nonzero()[:, 1].tolist()
    assert kept(_top_k_top_p(logits.clone(), torch.tensor([2]), torch.tensor([1.0]))) == [0, 1]
    probs = torch.softmax(logits, -1)[0]
    # p just above the top token's mass keeps two tokens; p below it keeps one.
    p = float(probs[0]) + 0.01
    assert kept(_top_k_top_p(logits.clone(), torch.tensor([0]), torch.tensor([p]))) == [0, 1]
    assert kept(_top_k_top_p(logits.clone(), torch.tensor([0]), torch.tensor([float(probs[0]) - 0.01]))) == [0]


def test_penalties_follow_their_definitions():
    vocab = 6
    base = torch.tensor([[2.0, -2.0, 1.0, 0.5, 0.0, 3.0]])
    s = seq([0, 1, 2, 2, 2, 1], n_prompt=2, repetition_penalty=2.0)
    logits = base.clone()
    _penalize(logits, [s])
    # seen tokens 0, 1, 2: positive divided, negative multiplied; unseen unchanged
    assert logits[0].tolist() == [1.0, -4.0, 0.5, 0.5, 0.0, 3.0]
    s = seq([0, 1, 2, 2, 2, 1], n_prompt=2, presence_penalty=0.5, frequency_penalty=0.25)
    logits = base.clone()
    _penalize(logits, [s])
    # output is [2, 2, 2, 1]: token 2 count 3, token 1 count 1; the prompt does not count
    expected = base[0].tolist()
    expected[2] -= 0.5 + 0.75
    expected[1] -= 0.5 + 0.25
    assert logits[0].tolist() == pytest.approx(expected)
    assert vocab == logits.shape[1]


def test_min_tokens_bans_stop_tokens_until_reached():
    logits = torch.full((1, 5), -10.0)
    logits[0, 1] = 10.0  # the stop token is by far the most likely
    s = seq([3, 4], n_prompt=2, temperature=0.0, stop_token_ids=(1,), min_tokens=2, max_tokens=5)
    assert sample(logits.clone(), [s]).token_ids != [1]
    s.token_ids += [2, 2]
    assert sample(logits.clone(), [s]).token_ids == [1]


def test_bad_word_sequences_are_never_completed():
    logits = torch.zeros(1, 6)
    logits[0, 4] = 5.0
    s = seq([1, 3], n_prompt=1, temperature=0.0, bad_token_sequences=((3, 4),))
    assert sample(logits.clone(), [s]).token_ids != [4]  # output ends with 3: 4 would complete "3 4"
    s2 = seq([1, 2], n_prompt=1, temperature=0.0, bad_token_sequences=((3, 4),))
    assert sample(logits.clone(), [s2]).token_ids == [4]


def test_logprobs_are_log_probabilities_of_the_sampled_tokens():
    logits = torch.tensor([[1.0, 2.0, 3.0]])
    s = seq([0], n_prompt=1, temperature=0.0, logprobs=True)
    result = sample(logits.clone(), [s])
    assert result.token_ids == [2]
    assert result.logprobs[0] == pytest.approx(math.log(math.exp(3) / (math.e + math.exp(2) + math.exp(3))))


def test_stop_tokens_sequences_and_length(checkpoints):
    folder, _ = checkpoints["gemma1"]
    engine = engine_for(folder)
    p = prompt(3, 8)
    free = engine.generate([p], SamplingParams(max_tokens=12, temperature=0.0))[0]

    def finish(params):
        engine.add_request("x", p, params)
        last = None
        while engine.has_unfinished():
            for out in engine.step():
                last = out
        return last

    out = finish(SamplingParams(max_tokens=12, temperature=0.0, stop_token_ids=(free[4],)))
    stop_at = free.index(free[4])
    assert out.finish_reason == "stop" and out.num_output_tokens == stop_at + 1  # the stop token is included
    out = finish(SamplingParams(max_tokens=12, temperature=0.0, stop_token_sequences=(tuple(free[5:7]),)))
    assert out.finish_reason == "stop" and out.num_output_tokens <= 7
    out = finish(SamplingParams(max_tokens=12, temperature=0.0))
    assert out.finish_reason == "length" and out.num_output_tokens == 12
    out = finish(SamplingParams(max_tokens=12, temperature=0.0, stop_token_ids=(free[0],), min_tokens=3))
    assert out.num_output_tokens >= 3


def test_penalties_apply_per_row_in_a_mixed_batch():
    base = torch.tensor([[2.0, -2.0, 1.0, 0.5, 0.0, 3.0]] * 3)
    rows = [seq([0, 1, 2, 2], n_prompt=2, repetition_penalty=2.0),
            seq([0, 1, 2, 2], n_prompt=2),  # no penalty: untouched
            seq([5, 3, 3], n_prompt=1, frequency_penalty=1.0)]
    logits = base.clone()
    _penalize(logits, rows)
    assert logits[0].tolist() == [1.0, -4.0, 0.5, 0.5, 0.0, 3.0]
    assert logits[1].tolist() == base[1].tolist()
    assert logits[2].tolist() == [2.0, -2.0, 1.0, -1.5, 0.0, 3.0]  # token 3 twice in the output


def test_seeded_request_is_independent_of_its_batch(checkpoints):
    folder, _ = checkpoints["gemma3"]
    target = SamplingParams(max_tokens=16, temperature=1.0, top_p=0.9, seed=7)
    p = prompt(5, 11)
    alone = engine_for(folder).generate([p], target)[0]
    others = [SamplingParams(max_tokens=n, temperature=1.0, seed=None if n % 2 else n) for n in (4, 9, 13)]
    batched = engine_for(folder).generate([prompt(6, 5), p, prompt(7, 20), prompt(8, 3)],
                                          [others[0], target, others[1], others[2]])
    assert batched[1] == alone
