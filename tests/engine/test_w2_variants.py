"""The W2 settings comparison (`gemma_serve.bench.w2_variants`) on a tiny engine on the CPU: each
knob is in force during its run only, and a run reports its steps."""

import pytest
from gemma_serve.bench.w2_variants import KNOBS, label, parse_variants, run_variant
from gemma_serve.engine import fused_kernels, model_runner
from gemma_serve.engine.config import EngineConfig
from gemma_serve.engine.llm_engine import LLMEngine
from gemma_serve.engine.sampling_params import SamplingParams


def test_parse_variants():
    assert parse_variants("base; qkv_heads=4;budget=4096,qkv_warps=4") == [
        {}, {"qkv_heads": "4"}, {"budget": "4096", "qkv_warps": "4"}]
    assert [label(v) for v in parse_variants("base;budget=8,overlap_eager=0")] == ["base", "budget=8,overlap_eager=0"]
    with pytest.raises(SystemExit, match="unknown knob"):
        parse_variants("qkv_head=4")


def test_each_knob_holds_during_its_run_only(checkpoints):
    folder, _ = checkpoints["gemma3"]
    engine = LLMEngine(EngineConfig(model=str(folder), device="cpu", dtype="float32", block_size=4,
                                    max_num_seqs=4, max_num_batched_tokens=32, cpu_kv_cache_tokens=512))
    prompts = [[10 + i + j for j in range(24)] for i in range(4)]  # 96 prompt rows
    params = SamplingParams(max_tokens=3, temperature=0.0, stop_token_ids=())
    base = run_variant(engine, {}, prompts, params)
    small = run_variant(engine, {"budget": "8"}, prompts, params)
    # 96 prompt rows take at least 3 steps of 32 and at least 12 of 8; the budget is back afterwards.
    assert 3 <= base["prompt_steps"] < 12 <= small["prompt_steps"]
    assert engine.scheduler.max_num_batched_tokens == 32
    assert small["variant"] == "budget=8" and small["output_tok_s"] > 0 and small["decode_steps"] > 0
    with pytest.raises(ValueError, match="budget=64"):
        run_variant(engine, {"qkv_warps": "8", "budget": "64"}, prompts, params)  # above the engine's own
    assert engine.scheduler.max_num_batched_tokens == 32 and fused_kernels.QKV_GROUP_WARPS == 0  # undone too

    def switches():
        return fused_kernels.QKV_HEADS_PER_PROGRAM, model_runner.OVERLAP_EAGER, fused_kernels.QKV_GROUP_WARPS

    before = switches()
    seen = []
    original = engine.step

    def step():  # what the module switches are while the variant runs
        seen.append(switches())
        return original()
    engine.step = step
    run_variant(engine, {"qkv_heads": "2", "overlap_eager": "0", "qkv_warps": "8"}, prompts, params)
    assert seen and set(seen) == {(2, False, 8)}
    assert switches() == before
    assert set(KNOBS) == {"qkv_heads", "qkv_warps", "budget", "overlap_eager", "node_len"}
    from gemma_serve.engine import attention

    default = attention.MIN_DECODE_NODE_LEN
    undo = KNOBS["node_len"](None, "2048")  # a start-up knob: set before an engine is built
    assert attention.MIN_DECODE_NODE_LEN == 2048 and attention.decode_node_len(1024) == 2048
    undo()
    assert attention.MIN_DECODE_NODE_LEN == default
