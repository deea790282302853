"""Diagnostic: what one kernel launch costs the host on this machine (F.linear, a Triton launch,
a torch elementwise op), in a fresh process and after an engine is built, and the first-token step
of a 128-token prompt on engines with and without CUDA graphs, the window pool and the float32
residual (so a TTFT change can be told apart from the host's own speed).

    PYTHONPATH=packages python3 bench/launch_probe.py
"""
import gc, inspect, sys, time
import torch, triton
sys.path.insert(0, "packages")
from gemma_serve.engine import fused_kernels as fk
from gemma_serve.engine.config import EngineConfig
from gemma_serve.engine.llm_engine import LLMEngine
from gemma_serve.engine.sampling_params import SamplingParams
from triton.runtime.jit import JITFunction

print("triton", triton.__version__, "torch", torch.__version__)
print("launch_pdl in JITFunction.run:", "launch_pdl" in inspect.getsource(JITFunction.run))
try:
    import triton.language.extra.cuda as tlc
    print("gdc:", [n for n in dir(tlc) if "gdc" in n])
except Exception as e:
    print("no extra.cuda", e)

def host_us(fn, n=300):
    fn(); torch.cuda.synchronize(); t = time.perf_counter()
    for _ in range(n):
        fn()
    t1 = time.perf_counter(); torch.cuda.synchronize(); t2 = time.perf_counter()
    return round((t1 - t) / n * 1e6, 1), round((t2 - t) / n * 1e6, 1)

x = torch.randn(128, 2560, device="cuda", dtype=torch.bfloat16)
w = torch.randn(4096, 2560, device="cuda", dtype=torch.bfloat16)
nw = torch.zeros(2560, device="cuda", dtype=torch.bfloat16)

def probe(tag):
    print(tag, "linear host/total us", host_us(lambda: torch.nn.functional.linear(x, w)),
          "rms_norm", host_us(lambda: fk.rms_norm(x, nw, 1e-6)), "add", host_us(lambda: x.add(1)), flush=True)

probe("fresh")

def first_token(engine, reps=6):
    vocab = engine.runner.model_config.vocab_size
    g = torch.Generator().manual_seed(0)
    times = []
    for i in range(reps):
        engine.add_request(f"r{i}", torch.randint(10, vocab - 10, (128,), generator=g).tolist(),
                           SamplingParams(max_tokens=4, temperature=0.0, stop_token_ids=()))
        torch.cuda.synchronize(); t = time.perf_counter()
        engine.step()
        torch.cuda.synchronize(); times.append((time.perf_counter() - t) * 1e3)
        engine.abort(f"r{i}")
        while engine.has_unfinished():
            engine.step()
    return [round(v, 2) for v in times]

base = dict(model="bench/configs/gemma-3-4b-it", load_format="random", device="cuda", dtype="bfloat16",
            max_num_seqs=256, max_num_batched_tokens=8192, max_model_len=1024, max_queue_len=1 << 20)
for over in ({}, {"cuda_graphs": False}, {"sliding_window_kv": False}, {"float32_residual": False}):
    t = time.perf_counter()
    engine = LLMEngine(EngineConfig(**base, **over))
    print(over, "engine built in %.1f s" % (time.perf_counter() - t), flush=True)
    probe(f"after engine {over}")
    print(over, "first-token step ms", first_token(engine), flush=True)
    if not over:
        torch.cuda.synchronize()
        from torch.profiler import ProfilerActivity, profile
        vocab = engine.runner.model_config.vocab_size
        engine.add_request("p", list(range(10, 138)), SamplingParams(max_tokens=4, temperature=0.0, stop_token_ids=()))
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            engine.step(); torch.cuda.synchronize()
        engine.abort("p")
        while engine.has_unfinished():
            engine.step()
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25), flush=True)
    del engine; gc.collect(); torch.cuda.empty_cache()
