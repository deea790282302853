"""Run `engine_bench` or `quant_bench` with other one-token tiles than the engine's rules pick, to
A/B a tile in the whole decode step (under PDL, early weights and the kernels around it) or in the
1-4-token layers, without a switch in the engine.

    python bench/tile_override.py --tiles one-token-tiles.json [--min-gain 0.02] -- --workloads W1 ...
    python bench/tile_override.py --tile int8:2560x2048=4x2048w8s2 --tool quant -- --batch 1,2,3,4 ...

--tiles: each projection of a `quant_bench --one-token-tiles` report takes its fastest tile where
that beat the engine's by --min-gain. --tile METHOD:NxK=ROWSxSTEPwWARPSsSTAGES sets one (bf16 or
int8; repeatable; wins over --tiles). 8-bit weights get the tile at every row count up to
FEW_TOKEN_ROWS, as the engine does (a row's sums must not depend on the batch).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

import torch

from gemma_serve.bench import engine_bench, quant_bench
from gemma_serve.engine import quantization as quant

Tiles = dict[tuple[str, int, int], quant.KernelConfig]
_SPEC = re.compile(r"^(bf16|int8):(\d+)x(\d+)=(\d+)x(\d+)w(\d+)s(\d+)$")


def report_tiles(report: dict, min_gain: float) -> Tiles:
    """(method, n, k) -> the fastest tile, where it beat the engine's tile by min_gain."""
    out = {}
    for row in report["one_token_tiles"]:
        if row["best_us"] < (1 - min_gain) * row["engine_us"]:
            out[(row["method"], row["n"], row["k"])] = quant.KernelConfig(**row["best_config"])
    return out


def parse_tile(spec: str) -> tuple[tuple[str, int, int], quant.KernelConfig]:
    match = _SPEC.match(spec)
    if match is None:
        raise ValueError(f"--tile {spec!r}: expected METHOD:NxK=ROWSxSTEPwWARPSsSTAGES, e.g. int8:2560x2048=8x2048w8s2")
    method, n, k, rows, step, warps, stages = match.groups()
    return (method, int(n), int(k)), quant.KernelConfig(1, int(rows), int(step), 1, int(warps), int(stages))


def install(tiles: Tiles) -> None:
    """Route `one_token_config` (16-bit) and `kernel_config` (8-bit, up to FEW_TOKEN_ROWS rows)
    through `tiles` first; the engine and the benchmarks look both up at call time."""
    engine_one_token, engine_kernel = quant.one_token_config, quant.kernel_config

    def one_token_config(n: int, k: int, *args, **kwargs) -> quant.KernelConfig:
        return tiles.get(("bf16", n, k)) or engine_one_token(n, k, *args, **kwargs)

    def kernel_config(m: int, n: int, k: int, num_sms: int, weight_dtype: torch.dtype = torch.int8,
                      *args, **kwargs) -> quant.KernelConfig:
        if m <= quant.FEW_TOKEN_ROWS and weight_dtype == torch.int8 and ("int8", n, k) in tiles:
            return tiles[("int8", n, k)]
        return engine_kernel(m, n, k, num_sms, weight_dtype, *args, **kwargs)

    quant.one_token_config, quant.kernel_config = one_token_config, kernel_config


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    ours, bench_args = (argv[:argv.index("--")], argv[argv.index("--") + 1:]) if "--" in argv else (argv, [])
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiles", type=Path, help="a quant_bench --one-token-tiles JSON report")
    parser.add_argument("--min-gain", type=float, default=0.02)
    parser.add_argument("--tile", action="append", default=[], help="METHOD:NxK=ROWSxSTEPwWARPSsSTAGES")
    parser.add_argument("--tool", choices=["engine", "quant"], default="engine")
    args = parser.parse_args(ours)
    tiles = report_tiles(json.loads(args.tiles.read_text()), args.min_gain) if args.tiles else {}
    tiles.update(parse_tile(spec) for spec in args.tile)
    for (method, n, k), cfg in sorted(tiles.items()):
        print(f"tile override {method} {n}x{k}: {cfg.block_n}x{cfg.block_k} w{cfg.num_warps} s{cfg.num_stages}",
              flush=True)
    install(tiles)
    return (engine_bench if args.tool == "engine" else quant_bench).main(bench_args)


if __name__ == "__main__":
    sys.exit(main())
