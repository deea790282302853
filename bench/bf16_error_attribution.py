"""Where the bf16 logits of Gemma 3 4B's shapes lose accuracy against float32, on CPU.

A float32 re-implementation of the decoder with a switchable set of "round to bf16 here" points,
one for every place where the CUDA bf16 engine (Triton kernels, cuBLAS) rounds to 16 bits. A bf16
tensor-core matmul is emulated as float32 products of bf16 values (exact) summed in float32, with
the output rounded when its point is on. Weights are the bf16 engine's own (`--engine`, CPU
`init_random_weights`, the test's seed) or fresh N(0, 0.02) bf16 values, so the float32 reference
and every rounded variant run on identical, bf16-representable weights.

The metric is the GPU test's (tests/gpu/test_cuda_graphs.py, bf16 logits of the 4B shapes):
rel_err = ||a - b|| / ||b|| over the logits of one teacher-forced decode step of 5 sequences
(prompts of 20, 77, 300, 9, 130 random tokens, the last 6 decoded). A decode step's logits are
those of the same position in a causal prefill of the whole prompt (the rounding points are
per row), so each prompt is run once in full and its last 6 positions are read.
`--setup proxy`: one 128-token prompt, its last 6 positions (4x cheaper).

Mixed steps: a point can round only the "prefill rows" (each prompt's positions before its last 6),
as when the prompts are prefilled in one long step and the last 6 positions decoded one at a time
with different roundings in the two kinds of step (e.g. float32 matmul outputs only in decode
steps up to 256 rows). The "mixed:" experiments do this; `--prefill-rows qkv,o_proj,...` restricts
those points, in every experiment run that rounds them, to the prefill rows. (The logits and the
final norm are computed on decode rows only, so there they mean "off"; embed_scale is not per row.)

    PYTHONPATH=packages python bench/bf16_error_attribution.py [--engine] [--setup test|proxy]
        [--only all,fp32_outputs,...] [--prefill-rows qkv,o_proj,...] [--steps]

`--steps`: also print each decode step's rel_err.

Memory: the bf16 weights (7.8 GB with the 262k vocabulary); each layer is widened to float32 as
it runs. One configuration is about 25 s of 2 CPU cores for the test's 536 tokens.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
MODEL = REPO / "bench" / "configs" / "gemma-3-4b-it"

# Every point where the CUDA bf16 engine rounds to 16 bits (with the float32 residual stream on).
POINTS = (
    "embed_scale",  # sqrt(hidden) rounded to bf16 (50.5 instead of 50.596), as Hugging Face in bf16
    "embed",  # embedding * scale rounded
    "norm_in",  # input_layernorm output (qkv_proj's input)
    "qkv",  # qkv_proj output
    "qk_norm",  # q_norm / k_norm outputs
    "rope_table",  # cos/sin tables in bf16
    "rope",  # q and k after RoPE (k: the bf16 KV cache; v is qkv's output as it is)
    "attn_p",  # unnormalised softmax probabilities rounded before P @ V (tensor cores)
    "attn_out",  # attention output (o_proj's input)
    "o_proj",  # o_proj output (post_attention_layernorm's input)
    "norm_ffn",  # pre_feedforward_layernorm output (gate_up's input)
    "gate_up",  # gate_up_proj output
    "gelu",  # gelu(gate) rounded before the product
    "mul",  # gelu(gate) * up (down_proj's input)
    "down",  # down_proj output (post_feedforward_layernorm's input)
    "final_norm",  # final norm output (LM head's input)
    "logits",  # LM head output
)
# Not on the CUDA path: the residual stream rounded after each add (before float32_residual); the
# CPU path's extra roundings (post-norm outputs before the add, RoPE as three bf16 operations).
EXTRA_POINTS = ("residual", "post_norm", "rope_ops")
CPU_ENGINE = (frozenset(POINTS) - {"attn_p", "rope"}) | {"post_norm", "rope_ops"}
ALL = frozenset(POINTS)
MATMUL_INPUTS = frozenset({"norm_in", "attn_out", "norm_ffn", "mul", "final_norm"})
MATMUL_OUTPUTS = frozenset({"qkv", "o_proj", "gate_up", "down", "logits"})


def bf(x: torch.Tensor) -> torch.Tensor:
    return x.bfloat16().float()


@dataclass
class Weights:
    """bf16 weights with the engine's layout (qkv and gate_up fused), norm weights as they are."""

    embed: torch.Tensor  # [V, H] bf16
    layers: list[dict[str, torch.Tensor]]
    final_norm: torch.Tensor

    @classmethod
    def from_model(cls, model: torch.nn.Module) -> Weights:
        layers = [{name: p.detach() for name, p in layer.named_parameters()} for layer in model.layers]
        return cls(model.embed_tokens.weight.detach(), layers, model.norm.weight.detach())


def _norm(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * (1.0 + w.float())


def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return x * cos + torch.cat([-x[..., half:], x[..., :half]], dim=-1) * sin


def _rope_bf16_ops(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """`apply_rotary` on bf16 tensors (the CPU path): each product and the sum rounded."""
    half = x.shape[-1] // 2
    return bf(bf(x * cos) + bf(torch.cat([-x[..., half:], x[..., :half]], dim=-1) * sin))


class Emulator:
    def __init__(self, cfg, weights: Weights, max_positions: int = 1024) -> None:
        from gemma_serve.engine.models.gemma import RotaryTable

        self.cfg, self.w = cfg, weights
        self.rope_global = RotaryTable(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling_factor, max_positions)
        self.rope_local = RotaryTable(cfg.head_dim, cfg.rope_local_theta, 1.0, max_positions)

    def forward(self, prompts: list[list[int]], last: int, on: frozenset[str],
                prefill: frozenset[str] = frozenset()) -> torch.Tensor:
        """Logits [last, len(prompts), V] of each prompt's last `last` positions.

        Points in `on` round every row; points in `prefill` (and not in `on`) round only the prefill
        rows, each prompt's positions before its last `last` (the decode rows).
        """
        cfg = self.cfg
        eps, heads, kvh, d = cfg.rms_norm_eps, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        ids = torch.tensor([t for p in prompts for t in p])
        positions = torch.cat([torch.arange(len(p)) for p in prompts])
        bounds = torch.tensor([0] + [len(p) for p in prompts]).cumsum(0).tolist()
        rows = torch.tensor([b - last + j for j in range(last) for b in bounds[1:]])
        prefill_rows = torch.ones(len(ids), dtype=torch.bool)
        prefill_rows[rows] = False

        def r(name: str, x: torch.Tensor, row_mask: torch.Tensor = prefill_rows) -> torch.Tensor:
            """x (rows first) rounded where `name` rounds: every row, the rows of `row_mask`, or none."""
            if name in on:
                return bf(x)
            if name in prefill:
                return torch.where(row_mask.view(-1, *(1,) * (x.dim() - 1)), bf(x), x)
            return x

        scale = cfg.hidden_size ** 0.5
        if "embed_scale" in on:
            scale = float(torch.tensor(scale, dtype=torch.bfloat16))
        h = r("embed", self.w.embed[ids].float() * scale)
        tables = {}
        for name, table in (("global", self.rope_global), ("local", self.rope_local)):
            cos, sin = (t[:, None, :] for t in table(positions))
            tables[name] = (r("rope_table", cos), r("rope_table", sin))
        q_size, kv_size = heads * d, kvh * d
        # Query rows whose probabilities are rounded before P @ V.
        p_rows = torch.full_like(prefill_rows, "attn_p" in on) | (prefill_rows & ("attn_p" in prefill))
        for i, lw in enumerate(self.w.layers):
            cos, sin = tables["local" if cfg.sliding[i] else "global"]
            window = cfg.sliding_window if cfg.sliding[i] else None
            x = r("norm_in", _norm(h, lw["input_layernorm.weight"], eps))
            qkv = r("qkv", x @ lw["qkv_proj.weight"].float().T)
            q, k, v = qkv.split([q_size, kv_size, kv_size], dim=-1)
            q, k, v = q.view(-1, heads, d), k.view(-1, kvh, d), v.view(-1, kvh, d)
            q = r("qk_norm", _norm(q, lw["q_norm.weight"], eps))
            k = r("qk_norm", _norm(k, lw["k_norm.weight"], eps))
            if "rope_ops" in on:
                q, k = _rope_bf16_ops(q, cos, sin), _rope_bf16_ops(k, cos, sin)
            else:
                q, k = r("rope", _rope(q, cos, sin)), r("rope", _rope(k, cos, sin))
            attn = torch.cat([self._attention(q[a:b], k[a:b], v[a:b], window, p_rows[a:b])
                              for a, b in zip(bounds[:-1], bounds[1:])])
            o = r("o_proj", r("attn_out", attn.reshape(-1, q_size)) @ lw["o_proj.weight"].float().T)
            post = r("post_norm", _norm(o, lw["post_attention_layernorm.weight"], eps))
            h = r("residual", h + r("residual", post))
            x = r("norm_ffn", _norm(h, lw["pre_feedforward_layernorm.weight"], eps))
            gate, up = r("gate_up", x @ lw["gate_up_proj.weight"].float().T).chunk(2, dim=-1)
            m = r("mul", r("gelu", F.gelu(gate, approximate="tanh")) * up)
            down = r("down", m @ lw["down_proj.weight"].float().T)
            post = r("post_norm", _norm(down, lw["post_feedforward_layernorm.weight"], eps))
            h = r("residual", h + r("residual", post))
        x = r("final_norm", _norm(h[rows], self.w.final_norm, eps), prefill_rows[rows])
        logits = torch.cat([x @ chunk.float().T for chunk in self.w.embed.split(32768)], dim=-1)
        return r("logits", logits, prefill_rows[rows]).view(last, len(prompts), -1)

    def _attention(self, q, k, v, window, p_rows):
        """One sequence, causal: q [L, heads, D], k/v [L, kv_heads, D] -> [L, heads, D].

        p_rows [L] bool: the query rows whose probabilities are rounded for P @ V.
        """
        length, heads, d = q.shape
        group = heads // k.shape[1]
        k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
        s = torch.einsum("lhd,shd->hls", q, k) * self.cfg.query_pre_attn_scalar ** -0.5
        i, j = torch.arange(length)[:, None], torch.arange(length)[None, :]
        allowed = j <= i
        if window is not None:
            allowed &= i - j < window
        s = s.masked_fill(~allowed, float("-inf"))
        p = torch.exp(s - s.amax(-1, keepdim=True))
        # As the kernels: the sum of the float32 probabilities, P rounded for the tensor-core P @ V.
        p_v = torch.where(p_rows[None, :, None], bf(p), p) if p_rows.any() else p
        out = torch.einsum("hls,shd->lhd", p_v, v) / p.sum(-1).transpose(0, 1)[..., None]
        return out


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def step_errs(logits: torch.Tensor, reference: torch.Tensor) -> list[float]:
    return [rel_err(a, b) for a, b in zip(logits, reference)]


def experiments() -> list[tuple[str, frozenset[str], frozenset[str]]]:
    """(name, rounding points on every row, on prefill rows only): calibration, groups,
    leave-one-out, one-alone, candidate fixes, mixed prefill/decode steps."""
    runs: list[tuple[str, frozenset[str]]] = [("all (CUDA engine, float32 residual)", ALL),
                                              ("all + bf16 residual (before 5a48445)", ALL | {"residual"})]
    runs += [("matmul inputs only", MATMUL_INPUTS), ("matmul outputs only", MATMUL_OUTPUTS),
             ("attention internals only", frozenset({"qk_norm", "rope_table", "rope", "attn_p"})),
             ("embedding only", frozenset({"embed_scale", "embed"}))]
    runs += [(f"all but {p}", ALL - {p}) for p in POINTS]
    runs += [(f"only {p}", frozenset({p})) for p in POINTS]
    # What each fix stops rounding. "Free": no extra bytes or kernels (the kernels already hold these
    # values in float32); the rest need float32 outputs from bf16 matmuls (fp32 accumulators stored).
    free = {"embed", "qk_norm", "rope_table", "gelu"}
    fixes = {
        "fix: free (embed, qk_norm, rope_table, gelu)": free,
        "fix: free + qkv, gate_up outputs": free | {"qkv", "gate_up"},
        "fix: free + all matmul outputs": free | MATMUL_OUTPUTS,
        "fix: free + logits output": free | {"logits"},
        "fix: free + all matmul outputs + embed_scale": free | MATMUL_OUTPUTS | {"embed_scale"},
        "fix: all matmul outputs": MATMUL_OUTPUTS,
        "fix: all but matmul inputs and P": ALL - MATMUL_INPUTS - {"attn_p"},
    }
    runs += [(name, ALL - frozenset(points)) for name, points in fixes.items()]
    # Float32 matmul outputs only in decode steps (up to 256 rows): one long prefill step of the
    # prompts keeps bf16 outputs, the last positions are decoded one step at a time without.
    engine = ALL - free
    mixed = [
        ("mixed: free, matmul outputs on prefill rows only", engine - MATMUL_OUTPUTS, MATMUL_OUTPUTS),
        ("mixed: free + matmul outputs but gate_up, gate_up on prefill rows only",
         engine - MATMUL_OUTPUTS, frozenset({"gate_up"})),
    ]
    return [(name, on, frozenset()) for name, on in runs] + mixed


def engine_logits(setup_prompts: list[list[int]], last: int):
    """The bf16 engine on CPU (its PyTorch paths): its weights and its teacher-forced decode logits."""
    from gemma_serve.engine.config import EngineConfig
    from gemma_serve.engine.llm_engine import LLMEngine

    from tests.gpu.test_cuda_graphs import _teacher_forced_decode_logits

    engine = LLMEngine(EngineConfig(model=str(MODEL), load_format="random", device="cpu", dtype="bfloat16",
                                    max_model_len=1024, num_kv_blocks=256, max_num_seqs=8,
                                    max_num_batched_tokens=1024))
    logits = torch.stack(_teacher_forced_decode_logits(engine, setup_prompts, last))
    return engine, logits


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--setup", choices=("test", "proxy"), default="test")
    parser.add_argument("--engine", action="store_true", help="weights and a comparison from the CPU bf16 engine")
    parser.add_argument("--only", help="comma-separated name prefixes of the experiments to run")
    parser.add_argument("--prefill-rows", default="",
                        help="comma-separated points rounded on prefill rows only in every experiment that rounds them")
    parser.add_argument("--steps", action="store_true", help="also print each decode step's rel_err")
    args = parser.parse_args()
    torch.set_grad_enabled(False)
    from gemma_serve.engine.model_config import ModelConfig

    cfg = ModelConfig.from_folder(MODEL)
    gen = torch.Generator().manual_seed(0)
    if args.setup == "test":
        prompts = [torch.randint(10, cfg.vocab_size - 10, (n,), generator=gen).tolist() for n in (20, 77, 300, 9, 130)]
    else:
        prompts = [torch.randint(10, cfg.vocab_size - 10, (128,), generator=gen).tolist()]
    last = 6
    start = time.time()
    if args.engine:
        engine, eng = engine_logits(prompts, last)
        weights = Weights.from_model(engine.runner.model)
        print(f"CPU bf16 engine: {time.time() - start:.0f} s")
    else:
        from gemma_serve.engine.model_runner import init_random_weights
        from gemma_serve.engine.models.gemma import GemmaModel

        with torch.device("meta"):
            model = GemmaModel(cfg, 1024)
        model = model.to_empty(device="cpu").to(torch.bfloat16)
        init_random_weights(model)
        weights = Weights.from_model(model)
    emu = Emulator(cfg, weights)
    t = time.time()
    reference = emu.forward(prompts, last, frozenset())
    print(f"setup {args.setup}: {len(prompts)} prompts, {sum(map(len, prompts))} tokens, last {last} positions, "
          f"vocab {cfg.vocab_size}; float32 reference {time.time() - t:.0f} s", flush=True)

    def report(name: str, logits: torch.Tensor) -> None:
        errs = step_errs(logits, reference)
        steps = f" {' '.join(f'{e:.2e}' for e in errs)} |" if args.steps else ""
        print(f"| {name:48s} | {sum(errs) / len(errs):.2e} | {max(errs):.2e} |{steps}", flush=True)

    header = "| rounding points on | rel_err mean over steps | max |" + (" per step |" if args.steps else "")
    print(header + "\n|---|---|---|" + ("---|" if args.steps else ""))
    if args.engine:
        report("CPU bf16 engine (fp32 P, RoPE in bf16 ops)", eng)
        cpu = emu.forward(prompts, last, CPU_ENGINE)
        report("emulated CPU engine", cpu)
        print(f"  emulation vs CPU engine: {['%.1e' % e for e in step_errs(cpu, eng)]}")
    only = args.only.split(",") if args.only else None
    prefill_rows = frozenset(args.prefill_rows.split(",")) - {""}
    assert prefill_rows <= set(POINTS + EXTRA_POINTS), f"unknown points: {prefill_rows}"
    for name, on, prefill in experiments():
        if only is None or any(name.startswith(o) for o in only):
            if on & prefill_rows:
                name += f" ({','.join(sorted(on & prefill_rows))} on prefill rows only)"
            report(name, emu.forward(prompts, last, on - prefill_rows, prefill | (on & prefill_rows)))


if __name__ == "__main__":
    main()
