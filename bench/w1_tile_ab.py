"""Engine A/B of one-token tiles: run `engine_bench` with the one-token kernel's tiles taken from a
`quant_bench --one-token-tiles` report instead of the engine's rules, to see whether a tile that is
faster alone makes a faster decode step (under PDL, early weights and the kernels around it).

    python bench/w1_tile_ab.py --tiles one-token-tiles.json [--min-gain 0.02] -- --workloads W1 ...

A projection takes the report's fastest tile when it beat the engine's by at least --min-gain;
the others keep the engine's. 8-bit weights get the tile at every row count up to FEW_TOKEN_ROWS
(a row's sums must not depend on the batch). A bench-only override: nothing in the engine reads it.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from gemma_serve.bench import engine_bench
from gemma_serve.engine import quantization as quant


def chosen_tiles(report: dict, min_gain: float) -> dict[tuple[str, int, int], quant.KernelConfig]:
    """(method, n, k) -> the fastest tile, where it beat the engine's tile by min_gain."""
    out = {}
    for row in report["one_token_tiles"]:
        if row["best_us"] < (1 - min_gain) * row["engine_us"]:
            out[(row["method"], row["n"], row["k"])] = quant.KernelConfig(**row["best_config"])
    return out


def install(tiles: dict[tuple[str, int, int], quant.KernelConfig]) -> None:
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
    parser.add_argument("--tiles", type=Path, required=True, help="a quant_bench --one-token-tiles JSON report")
    parser.add_argument("--min-gain", type=float, default=0.02)
    args = parser.parse_args(ours)
    tiles = chosen_tiles(json.loads(args.tiles.read_text()), args.min_gain)
    for (method, n, k), cfg in sorted(tiles.items()):
        print(f"tile override {method} {n}x{k}: {cfg.block_n}x{cfg.block_k} w{cfg.num_warps} s{cfg.num_stages}",
              flush=True)
    install(tiles)
    return engine_bench.main(bench_args)


if __name__ == "__main__":
    sys.exit(main())
