"""load() on the TensorRT-LLM path fails fast, with a message that says what to do, when the engine is
missing, built for another GPU or TensorRT-LLM, or never becomes ready in tritonserver (the real one
from the nvidia-pytriton wheel, which has no TensorRT-LLM backend). Images stay a 400."""

import json
import time
from pathlib import Path

import pytest
import yaml
from gemma_serve.api.service import GemmaService
from gemma_serve.api.tokenizer import Tokenizer
from gemma_serve.settings import ServingSettings
from gemma_serve.triton import trtllm_repository
from gemma_serve.triton.client import TritonClient
from gemma_serve.triton.trtllm_engine import (
    NGC_IMAGE,
    EngineBuild,
    EngineError,
    GpuInfo,
    check_compatibility,
    resolve_engine,
)
from gemma_serve.triton.trtllm_repository import TENSORRT_LLM_MODEL
from starlette.requests import Request

from model.model import Model

from .conftest import A100, H100, engine_build, make_engine_dir

REPO = Path(__file__).resolve().parents[2]


def model(tmp_path: Path, **metadata) -> Model:
    meta = {"engine": "tensorrt_llm", "triton_grpc_port": 0, "triton_http_port": 0, "triton_metrics_port": 0,
            "workdir": str(tmp_path / "work"), **metadata}
    return Model(config={"model_metadata": meta}, secrets={}, data_dir=REPO / "data")


def load_fails(m: Model, *fragments: str, within_s: float = 10) -> str:
    start = time.monotonic()
    with pytest.raises(EngineError) as err:
        m.load()
    assert time.monotonic() - start < within_s, "must fail fast"
    message = str(err.value)
    for fragment in fragments:
        assert fragment in message, message
    return message


def test_missing_engine_folder(tmp_path, fake_gpu):
    fake_gpu(H100)
    load_fails(model(tmp_path, engine_repository=str(tmp_path / "no-engine")), "does not exist", "./build_engine.sh")


def test_folder_that_is_not_an_engine(tmp_path, fake_gpu):
    fake_gpu(H100)
    (tmp_path / "empty").mkdir()
    load_fails(model(tmp_path, engine_repository=str(tmp_path / "empty")),
               "is not a TensorRT-LLM engine", "engine_build.json", "./build_engine.sh")


def test_no_engine_repository_configured(tmp_path, fake_gpu):
    fake_gpu(H100)
    load_fails(model(tmp_path), "needs engine_repository")


def test_engine_built_for_another_gpu(tmp_path, fake_gpu):
    fake_gpu(H100)
    engine = make_engine_dir(tmp_path / "engine", engine_build(gpu=A100))
    load_fails(model(tmp_path, engine_repository=str(engine)),
               A100[0], H100[0], "compute capability 8.0", "rebuild it on a NVIDIA H100", "accelerator")


def test_no_gpu_at_all(tmp_path, fake_gpu):
    fake_gpu(None)
    engine = make_engine_dir(tmp_path / "engine")
    load_fails(model(tmp_path, engine_repository=str(engine)), "no NVIDIA GPU is visible", "engine: portable")


def test_engine_of_another_tensorrt_llm_release(tmp_path, fake_gpu):
    fake_gpu(H100)
    engine = make_engine_dir(tmp_path / "engine", engine_build(tensorrt_llm_version="0.17.0"))
    load_fails(model(tmp_path, engine_repository=str(engine)), "TensorRT-LLM 0.17.0", NGC_IMAGE)


def test_incomplete_tensor_parallel_engine(tmp_path, fake_gpu):
    fake_gpu(H100, count=2)
    engine = make_engine_dir(tmp_path / "engine", engine_build(tp_size=2), ranks=1)
    load_fails(model(tmp_path, engine_repository=str(engine)), "rank1.engine missing")


def test_compatibility_rules():
    build = EngineBuild.from_json(engine_build(tp_size=2))
    h100 = GpuInfo(*H100)
    check_compatibility(build, [h100, h100], "0.19.0.post1")
    with pytest.raises(EngineError, match="this image has 0.20.0"):
        check_compatibility(build, [h100, h100], "0.20.0")
    with pytest.raises(EngineError, match="tensor parallelism 2"):
        check_compatibility(build, [h100], "0.19.0")
    # Same architecture, other GPU model (H200 for an H100 engine): loads, with a warning only.
    check_compatibility(build, [GpuInfo("NVIDIA H200", "9.0")] * 2, None)
    with pytest.raises(EngineError, match="malformed"):
        EngineBuild.from_json({"tensorrt_llm_version": "0.19.0"})


def test_engine_without_engine_build_json_is_described_by_trtllm_build_config(tmp_path):
    engine = tmp_path / "engine"
    engine.mkdir()
    (engine / "config.json").write_text(json.dumps({
        "version": "0.19.0",
        "pretrained_config": {"architecture": "GemmaForCausalLM", "mapping": {"tp_size": 1},
                              "quantization": {"quant_algo": "W8A16"}},
        "build_config": {"max_batch_size": 8, "max_input_len": 512, "max_seq_len": 1024,
                         "plugin_config": {"use_paged_context_fmha": True}}}))
    build = EngineBuild.from_engine_dir(engine)
    assert (build.max_batch_size, build.max_seq_len, build.quantization, build.gpu_name) == (8, 1024, "w8a16", None)


def test_auto_picks_tensorrt_llm_only_with_the_backend_and_an_engine(tmp_path):
    backend = tmp_path / "backends" / "tensorrtllm"
    auto = ServingSettings.load({"engine": "auto", "engine_repository": "org/engine"}, environ={})
    assert resolve_engine(auto, backend) == "portable"
    backend.mkdir(parents=True)
    assert resolve_engine(auto, backend) == "tensorrt_llm"
    assert resolve_engine(ServingSettings.load({"engine": "auto"}, environ={}), backend) == "portable"
    assert resolve_engine(ServingSettings.load({}, environ={}), backend) == "portable"
    # What `make serve` reads: config.yaml on a machine without the NGC image's backend.
    meta = yaml.safe_load((REPO / "config.yaml").read_text())["model_metadata"]
    assert resolve_engine(ServingSettings.load(meta, environ={})) == "portable"


def test_server_that_never_becomes_ready_fails_fast_with_its_log(tmp_path, fake_gpu, monkeypatch, tiny_model_dir):
    fake_gpu(H100)
    # Let the path past the backend check: the pytriton tritonserver then cannot load the model.
    backend = tmp_path / "tensorrtllm"
    backend.mkdir()
    monkeypatch.setattr(trtllm_repository, "TRTLLM_BACKEND_DIR", backend)
    engine = make_engine_dir(tmp_path / "engine")
    message = load_fails(model(tmp_path, engine_repository=str(engine), tokenizer_repository=str(tiny_model_dir),
                               triton_startup_timeout_s=60),
                         "did not load the TensorRT-LLM engine", "tritonserver.log", "rebuild it", "tensorrtllm",
                         within_s=60)
    assert "tritonserver exited" in message or "not ready after" in message
    rendered = (tmp_path / "work" / "model_repository" / TENSORRT_LLM_MODEL / "config.pbtxt").read_text()
    assert str(engine) in rendered


async def test_image_requests_are_refused_with_a_400(tiny_model_dir):
    settings = ServingSettings.load({"engine": "tensorrt_llm", "engine_repository": "org/engine"}, environ={})
    service = GemmaService(settings, Tokenizer.load(str(tiny_model_dir)), None,
                           TritonClient("127.0.0.1:1", TENSORRT_LLM_MODEL))
    body = json.dumps({"messages": [{"role": "user", "content": [
        {"type": "text", "text": "What is this?"},
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}}]}]}).encode()

    async def receive():
        return {"type": "http.request", "body": body, "more_body": False}

    for route in (service.predict, service.chat_completions):
        request = Request({"type": "http", "method": "POST", "path": "/", "headers": [], "query_string": b""},
                          receive)
        response = await route(request)
        assert response.status_code == 400
        assert b"image" in response.body
