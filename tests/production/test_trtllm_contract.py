"""The tensors TritonClient sends must be ones the TensorRT-LLM backend reads: it looks inputs up by name
and ignores any other, so a misnamed or undeclared tensor would be a silently dropped option. Names come
from contract.py and from the rendered tensorrt_llm config, never from a list copied here."""

import dataclasses
from pathlib import Path

import pytest
from gemma_serve.settings import ServingSettings
from gemma_serve.triton import contract
from gemma_serve.triton.client import TritonClient
from gemma_serve.triton.contract import GenerationRequest
from gemma_serve.triton.trtllm_repository import (
    TENSORRT_LLM_MODEL,
    EngineModelParams,
    render_tensorrt_llm_repository,
)
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2


@pytest.fixture(scope="module")
def config(tmp_path_factory) -> model_config_pb2.ModelConfig:
    out = tmp_path_factory.mktemp("trtllm")
    render_tensorrt_llm_repository(ServingSettings.load({}, environ={}),
                                   EngineModelParams(Path("/engine"), max_batch_size=64, enable_kv_cache_reuse=True),
                                   out)
    return text_format.Parse((out / TENSORRT_LLM_MODEL / "config.pbtxt").read_text(), model_config_pb2.ModelConfig())


def request_with_every_option() -> GenerationRequest:
    request = GenerationRequest(
        input_ids=[2, 651, 6037, 576], max_tokens=32, end_id=1, pad_id=3, streaming=False, temperature=0.7,
        top_k=40, top_p=0.9, repetition_penalty=1.1, presence_penalty=0.5, frequency_penalty=0.25, seed=1234,
        min_tokens=2, stop_sequences=[[106], [7, 8]], bad_sequences=[[9]], logprobs=True)
    defaults = GenerationRequest(input_ids=[], max_tokens=0, end_id=0)
    # Images are the portable engine's alone: the API layer refuses them for TensorRT-LLM.
    unset = [f.name for f in dataclasses.fields(GenerationRequest)
             if f.name not in ("pixel_values", "image_hashes") and getattr(request, f.name) == getattr(defaults, f.name)]
    assert not unset, f"set {unset} in request_with_every_option(): every option must reach the wire"
    return request


def test_every_tensor_the_client_sends_is_declared_with_its_type_and_rank(config):
    declared = {i.name: i for i in config.input}
    sent = TritonClient("127.0.0.1:1", TENSORRT_LLM_MODEL)._inputs(request_with_every_option())
    assert {t.name() for t in sent} == {s.name for s in contract.INPUTS}, "the full request sends every text input"
    for tensor in sent:
        name, shape = tensor.name(), tensor.shape()
        assert name in declared, f"the client sends '{name}', which the tensorrt_llm model does not declare"
        spec = declared[name]
        assert model_config_pb2.DataType.Name(spec.data_type) == "TYPE_" + tensor.datatype(), name
        # Leading batch dimension (max_batch_size > 0), then the declared dims.
        assert config.max_batch_size >= 1 and shape[0] == 1, name
        assert len(shape) == 1 + len(spec.dims), f"{name}: sent rank {len(shape)}, declared {list(spec.dims)}"
        for sent_dim, dim in zip(shape[1:], spec.dims):
            assert dim in (-1, sent_dim), f"{name}: sent shape {shape}, declared dims {list(spec.dims)}"


def test_every_required_input_is_sent(config):
    required = {i.name for i in config.input if not i.optional}
    sent = set(contract.to_tensors(request_with_every_option()))
    minimal = set(contract.to_tensors(GenerationRequest(input_ids=[2, 3], max_tokens=1, end_id=1)))
    assert required <= minimal <= sent, f"required by the model but not always sent: {required - minimal}"


def test_the_contract_matches_the_declarations(config):
    declared = {i.name: (model_config_pb2.DataType.Name(i.data_type), tuple(i.dims)) for i in config.input}
    for spec in contract.INPUTS:
        assert declared.get(spec.name) == ("TYPE_" + spec.data_type, spec.dims), spec.name


def test_every_output_the_client_requests_is_declared(config):
    declared = {o.name: (model_config_pb2.DataType.Name(o.data_type), tuple(o.dims)) for o in config.output}
    for spec in contract.OUTPUTS:
        assert declared.get(spec.name) == ("TYPE_" + spec.data_type, spec.dims), spec.name
