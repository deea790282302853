"""The engine's warm-up (`ModelRunner._warm_up`): eager steps of every row-count class up to a full
token budget, run before serving so that no kernel compiles inside a request. On CPU: they write
only the scratch block (block 0 without graphs), in every pool, and leave the engine's outputs as a
fresh engine's. tests/gpu/test_warm_up.py checks on a GPU that serving then compiles nothing."""

import pytest
from gemma_serve.engine.sampling_params import SamplingParams

from .conftest import engine_for, prompt


@pytest.mark.parametrize("generation", ["gemma2", "gemma3"])
def test_warm_up_writes_only_the_scratch_block_and_changes_no_output(checkpoints, generation):
    folder, _ = checkpoints[generation]
    # A budget above max_model_len: the warm-up's prompt chunks must split to stay within it.
    config = dict(max_num_batched_tokens=700, max_model_len=300, num_kv_blocks=256)
    engine = engine_for(folder, **config)
    runner = engine.runner
    assert runner.warm_up_sizes() == [4, 16, 32, 64, 256, 700]
    for k, v in runner.kv_caches:
        k.fill_(7.0)
        v.fill_(7.0)
    runner._warm_up()
    for k, v in runner.kv_caches:
        for cache in (k, v):
            changed = (cache != 7.0).flatten(1).any(dim=1)
            assert changed[0] and not changed[1:].any()
    params = SamplingParams(max_tokens=6, temperature=0.0)
    prompts = [prompt(1, 20), prompt(2, 290), prompt(3, 5)]
    assert engine.generate(prompts, params) == engine_for(folder, **config).generate(prompts, params)
