"""After the engine's start-up (graph capture and the eager warm-up), serving compiles no Triton
kernel: steps of every shape (prompt chunks of odd and even lengths, a few or many decode rows, a
full token budget, decode batches off the graph ladder) reuse what the start-up compiled. In the
ninth H200 run, before the warm-up covered them, W2's first two steps compiled the prefill and
decode kernels for 2.4 and 3.1 s."""

import random

import pytest
from gemma_serve.engine.compile_log import CompileLog
from gemma_serve.engine.sampling_params import SamplingParams

from tests.engine.conftest import checkpoints, prompt  # noqa: F401  (checkpoints is a fixture)
from tests.gpu.test_cuda_graphs import cuda_engine

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("dtype,quantization", [("bfloat16", "none"), ("bfloat16", "int8"), ("float32", "none")])
def test_serving_compiles_nothing_after_the_warm_up(checkpoints, dtype, quantization):  # noqa: F811
    folder, _ = checkpoints["gemma3"]
    with CompileLog() as start:
        engine = cuda_engine(folder, dtype=dtype, quantization=quantization, block_size=16, num_kv_blocks=2048,
                             max_num_batched_tokens=1024, max_num_seqs=64, max_model_len=512)
    if not start.supported:
        pytest.skip("this Triton has no JITFunction._do_compile to watch")
    assert start.compiles, "the start-up compiled nothing: the log does not see compiles"
    rng = random.Random(0)
    with CompileLog() as serving:
        for wave in range(3):
            for i in range(rng.choice([5, 16, 37, 64])):
                length = rng.choice([1, 2, 7, 16, 33, 250, 400, 503])
                engine.add_request(f"w{wave}-{i}", prompt(1000 * wave + i, length),
                                   SamplingParams(max_tokens=rng.randint(1, 9), temperature=0.0))
            for _ in range(rng.randint(1, 6)):
                engine.step()
        while engine.has_unfinished():
            engine.step()
    assert not serving.compiles, serving.summary()
