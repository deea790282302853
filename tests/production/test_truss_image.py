"""`truss image build-context` (what `truss push` and `truss image build` build from) on this repository:
the Dockerfile starts from the configured NGC image, installs the pinned requirements with its Python,
and ships packages/ and data/ (the tensorrt_llm template included)."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from gemma_serve.triton.trtllm_engine import NGC_IMAGE

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def context(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("truss") / "context"
    truss = Path(sys.executable).parent / "truss"
    result = subprocess.run([str(truss) if truss.exists() else "truss", "image", "build-context", str(out), str(REPO)],
                            capture_output=True, text=True, timeout=300, check=False,
                            env={**os.environ, "TRUSS_SKIP_UPDATE_CHECK": "1"})
    assert result.returncode == 0, result.stdout + result.stderr
    return out


@pytest.fixture(scope="module")
def config() -> dict:
    return yaml.safe_load((REPO / "config.yaml").read_text())


def test_config_targets_the_pinned_image_and_a_gpu(config):
    assert config["base_image"]["image"] == NGC_IMAGE
    assert config["resources"]["use_gpu"] and config["resources"]["accelerator"]
    assert "hf_access_token" in config["secrets"]
    assert config["requirements_file"] == "requirements.txt"
    meta = config["model_metadata"]
    assert meta["engine"] == "auto" and {"engine_repository", "tokenizer_repository", "model"} <= set(meta)


def test_dockerfile_uses_the_base_image_and_installs_the_requirements(context, config):
    dockerfile = (context / "Dockerfile").read_text()
    assert re.search(rf"^FROM {re.escape(config['base_image']['image'])}\b", dockerfile, re.MULTILINE)
    python = config["base_image"]["python_executable_path"]
    installs = re.findall(r"^RUN .*pip install .*--python (\S+) -r (\S+)", dockerfile, re.MULTILINE)
    assert (python, "user_requirements.txt") in installs, installs
    ours = [line.strip() for line in (REPO / "requirements.txt").read_text().splitlines()
            if line.strip() and not line.startswith("#")]
    shipped = (context / "user_requirements.txt").read_text()
    assert all(req in shipped for req in ours)


def test_image_ships_packages_and_data(context):
    dockerfile = (context / "Dockerfile").read_text()
    assert re.search(r"^COPY .*\./packages /packages$", dockerfile, re.MULTILINE)
    assert re.search(r"^COPY .*\./data \$\{APP_HOME\}/data$", dockerfile, re.MULTILINE)
    for path in ("packages/gemma_serve/triton/trtllm_engine.py", "packages/gemma_serve/triton/trtllm_repository.py",
                 "data/triton/tensorrt_llm/config.pbtxt.j2", "data/triton/gemma_portable/config.pbtxt.j2",
                 "model/model.py"):
        assert (context / path).is_file(), path
    assert not (context / "tests").exists(), ".truss_ignore keeps tests out of the image"
