"""The one-token tile A/B tools on CPU: `quant_bench.one_token_tile_grid` (what `--one-token-tiles`
times) and `bench/tile_override.py` (which tiles it hands the engine instead of its own)."""

import importlib.util
from pathlib import Path

import pytest
import torch
from gemma_serve.bench import quant_bench
from gemma_serve.engine import quantization as quant

_PATH = Path(__file__).resolve().parents[2] / "bench" / "tile_override.py"
_SPEC = importlib.util.spec_from_file_location("tile_override", _PATH)
tile_override = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(tile_override)


def test_tile_grid_has_only_tiles_the_engine_could_run():
    for method in ("bf16", "int8"):
        for name, (n, k) in quant_bench.SHAPES.items():
            grid = quant_bench.one_token_tile_grid(method, name, k)
            assert grid and len(set(grid)) == len(grid)
            assert quant.one_token_config(n, k) in grid or method == "int8"
            for cfg in grid:
                assert cfg.block_m == 1 and cfg.split_k == 1 and k % cfg.block_k == 0
                if name == "gate_up":  # the GELU epilogue pairs gate and up rows
                    assert cfg.block_n % 2 == 0
                if method == "int8":  # half2 takes the tile (otherwise the slower exact path runs)
                    assert cfg.block_n * cfg.block_k >= 16 * 32 * cfg.num_warps
    # The engine's INT8 tiles are among those timed.
    for name, (n, k) in quant_bench.SHAPES.items():
        assert quant.kernel_config(1, n, k, 132) in quant_bench.one_token_tile_grid("int8", name, k)


def test_tile_spec_parses_and_a_bad_one_is_refused():
    key, cfg = tile_override.parse_tile("int8:20480x2560=16x256w4s2")
    assert key == ("int8", 20480, 2560) and cfg == quant.KernelConfig(1, 16, 256, 1, 4, 2)
    for bad in ("int8:20480x2560=16x256", "fp8:1x1=1x1w1s1", "int8:20480x2560=16x256w4s2 "):
        with pytest.raises(ValueError, match="expected METHOD"):
            tile_override.parse_tile(bad)


def test_report_tiles_take_only_a_clear_gain():
    def row(method, engine_us, best_us):
        return dict(method=method, n=2560, k=10240, engine_us=engine_us, best_us=best_us,
                    best_config=dict(block_m=1, block_n=2, block_k=1024, split_k=1, num_warps=4, num_stages=2,
                                     swap_ab=True))
    report = {"one_token_tiles": [row("bf16", 15.5, 12.9), row("int8", 7.83, 7.76)]}
    assert set(tile_override.report_tiles(report, 0.02)) == {("bf16", 2560, 10240)}
    assert set(tile_override.report_tiles(report, 0.0)) == {("bf16", 2560, 10240), ("int8", 2560, 10240)}


def test_installed_tiles_reach_the_one_token_kernel_only(monkeypatch):
    # Restored after the test: install() replaces the module's functions.
    monkeypatch.setattr(quant, "one_token_config", quant.one_token_config)
    monkeypatch.setattr(quant, "kernel_config", quant.kernel_config)
    engine_qkv = quant.one_token_config(4096, 2560)
    engine_wide = quant.kernel_config(16, 20480, 2560, 132)
    tiles = dict([tile_override.parse_tile("bf16:2560x10240=1x1024w4s2"),
                  tile_override.parse_tile("int8:20480x2560=16x256w4s2")])
    tile_override.install(tiles)
    assert quant.one_token_config(2560, 10240) == quant.KernelConfig(1, 1, 1024, 1, 4, 2)
    assert quant.one_token_config(4096, 2560) == engine_qkv  # not overridden
    for m in range(1, quant.FEW_TOKEN_ROWS + 1):  # every row count of the one-token kernel alike
        assert quant.kernel_config(m, 20480, 2560, 132) == quant.KernelConfig(1, 16, 256, 1, 4, 2)
    assert quant.kernel_config(16, 20480, 2560, 132) == engine_wide  # the matrix-unit kernel keeps its tiles
    if hasattr(torch, "float8_e4m3fn"):  # 8-bit floats are not INT8's tiles
        assert quant.kernel_config(1, 20480, 2560, 132, torch.float8_e4m3fn).block_n == 8
