"""The pieces of the full-stack vs direct benchmark (bench/gpu_full_stack.sh) that need no server: the
overhead table, the shapes checkpoint's tokenizer, and the sweep's request counts."""

import argparse
import csv
import json

import pytest

from gemma_serve.bench import cli, overhead
from gemma_serve.bench.shapes_checkpoint import filler_token, make_shapes_checkpoint
from gemma_serve.tiny_model import VOCAB_SIZE


def _summary(folder, rows):
    folder.mkdir(parents=True)
    with open(folder / "summary.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["concurrency", "successful", "output_throughput", "ttft_ms_mean",
                                               "ttft_ms_p99", "itl_ms_mean", "e2e_ms_mean"])
        writer.writeheader()
        writer.writerows(rows)


def test_overhead_matches_levels_and_divides_full_by_direct(tmp_path):
    _summary(tmp_path / "full", [
        {"concurrency": 1, "successful": 4, "output_throughput": 50, "ttft_ms_mean": 30, "ttft_ms_p99": 40,
         "itl_ms_mean": 20, "e2e_ms_mean": 1000},
        {"concurrency": 8, "successful": 0, "output_throughput": 0, "ttft_ms_mean": "", "ttft_ms_p99": "",
         "itl_ms_mean": "", "e2e_ms_mean": ""}])  # a level with no successful request counts as missing
    _summary(tmp_path / "direct", [
        {"concurrency": 1, "successful": 4, "output_throughput": 100, "ttft_ms_mean": 10, "ttft_ms_p99": 20,
         "itl_ms_mean": 10, "e2e_ms_mean": 500},
        {"concurrency": 8, "successful": 8, "output_throughput": 400, "ttft_ms_mean": 15, "ttft_ms_p99": 30,
         "itl_ms_mean": 12, "e2e_ms_mean": 800}])
    assert overhead.main(["--pair", "128x64", str(tmp_path / "full"), str(tmp_path / "direct"),
                          "--pair", "512x256", str(tmp_path / "missing"), str(tmp_path / "direct"),
                          "--out", str(tmp_path / "out")]) == 0
    rows = list(csv.DictReader(open(tmp_path / "out" / "overhead.csv")))
    first = rows[0]
    assert (first["workload"], first["concurrency"]) == ("128x64", "1")
    assert float(first["ratio_output_throughput"]) == 0.5 and float(first["ratio_ttft_ms_mean"]) == 3.0
    assert rows[1]["full_output_throughput"] == "" and float(rows[1]["direct_output_throughput"]) == 400
    assert [r["workload"] for r in rows] == ["128x64", "128x64", "512x256", "512x256"]
    table = (tmp_path / "out" / "overhead.md").read_text()
    assert "| 128x64 | 1 | 50.0 | 100.0 | 0.50 |" in table
    assert (tmp_path / "out" / "overhead.png").stat().st_size > 0


def test_shapes_checkpoint_pads_the_tiny_tokenizer_to_the_config_vocabulary(tmp_path):
    config = {"model_type": "gemma3", "text_config": {"vocab_size": 5000, "max_position_embeddings": 4096},
              "eos_token_id": [1, 106]}
    (tmp_path / "cfg").mkdir()
    (tmp_path / "cfg" / "config.json").write_text(json.dumps(config))
    out = make_shapes_checkpoint(tmp_path / "cfg", tmp_path / "ckpt")
    assert json.loads((out / "config.json").read_text()) == config

    from gemma_serve.api.detokenizer import IncrementalDetokenizer
    from gemma_serve.api.tokenizer import Tokenizer

    tok = Tokenizer.load(str(out), max_model_len=1024)
    assert len(tok.hf) == 5000
    # Prompts encode to the tiny vocabulary; every padded id decodes to visible text, one word each.
    assert max(tok.encode_chat([{"role": "user", "content": "Hello there, how are you today?"}])) < VOCAB_SIZE
    detok = IncrementalDetokenizer(tok)
    assert [detok.push([i]) for i in (VOCAB_SIZE, 4999)] == [" w280", " w1387"]
    assert filler_token(4999) == "▁w1387"


def test_shapes_checkpoint_refuses_a_vocabulary_smaller_than_the_tokenizer(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"vocab_size": 100}))
    with pytest.raises(ValueError, match="smaller"):
        make_shapes_checkpoint(tmp_path, tmp_path / "ckpt")


def test_sweep_rounds_scale_requests_with_concurrency():
    parser = argparse.ArgumentParser()
    cli.add_arguments(parser)
    args = parser.parse_args(["--mode", "sweep", "--sweep", "1,8,32,128", "--num-requests", "8", "--rounds", "4"])
    assert [s.num_requests for s in cli.build_schedules(args)] == [8, 32, 128, 512]
    args = parser.parse_args(["--mode", "sweep", "--sweep", "1,8", "--num-requests", "8"])
    assert [s.num_requests for s in cli.build_schedules(args)] == [8, 8]
