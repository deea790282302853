import json

from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2

from gemma_serve.settings import ServingSettings
from gemma_serve.triton import contract
from gemma_serve.triton.repository import PORTABLE_MODEL, render_portable_repository


def _parse(path) -> model_config_pb2.ModelConfig:
    return text_format.Parse(path.read_text(), model_config_pb2.ModelConfig())


def test_portable_repository_parses_with_tritons_schema_and_matches_the_contract(tmp_path):
    settings = ServingSettings.load({"model": "/models/x", "max_num_seqs": 32, "block_size": 8},
                                    environ={})
    root = render_portable_repository(settings, tmp_path)
    config = _parse(root / PORTABLE_MODEL / "config.pbtxt")
    assert config.name == PORTABLE_MODEL and config.backend == "python"
    assert config.model_transaction_policy.decoupled
    assert config.max_batch_size == 32
    declared = {i.name: (model_config_pb2.DataType.Name(i.data_type), tuple(i.dims)) for i in config.input}
    expected = {s.name: (s.config_type, s.dims) for s in contract.INPUTS + contract.IMAGE_INPUTS}
    assert declared == expected
    assert declared["image_hashes"][0] == "TYPE_STRING"
    required = {i.name for i in config.input if not i.optional}
    assert required == {s.name for s in contract.INPUTS if not s.optional}
    engine = json.loads(config.parameters["engine_config"].string_value)
    assert engine["model"] == "/models/x" and engine["block_size"] == 8 and "hf_token" not in engine
    assert (root / PORTABLE_MODEL / "1" / "model.py").exists()


def test_settings_environment_overrides_config_yaml():
    settings = ServingSettings.load({"model": "a", "max_num_seqs": 4},
                                    environ={"GEMMA_SERVE_MODEL": "b", "GEMMA_SERVE_MAX_MODEL_LEN": "512"})
    assert settings.model == "b" and settings.max_num_seqs == 4 and settings.max_model_len == 512
