import dataclasses

import pytest

from gemma_serve.api.errors import APIError
from gemma_serve.api.pipeline import GenerationPipeline
from gemma_serve.api.schemas import PredictRequest
from gemma_serve.api.tokenizer import Tokenizer


@pytest.fixture
def pipeline(tiny_tokenizer):
    small = Tokenizer(tiny_tokenizer.hf, dataclasses.replace(tiny_tokenizer.info, max_model_len=64))
    return GenerationPipeline(small, client=None, default_max_tokens=16)


def test_greedy_maps_to_top_k_1_and_eos_ids_become_stops(pipeline, tiny_tokenizer):
    fields = PredictRequest(prompt="hi", temperature=0.0, max_tokens=5)
    prepared = pipeline.prepare([2, 10, 11], fields)
    request = prepared.request
    assert request.top_k == 1 and request.temperature == 1.0
    assert request.end_id == tiny_tokenizer.info.stop_ids[0]
    assert [s[0] for s in request.stop_sequences] == tiny_tokenizer.info.stop_ids[1:]


def test_ignore_eos_sends_no_stop_ids(pipeline):
    prepared = pipeline.prepare([2, 10], PredictRequest(prompt="x", ignore_eos=True))
    assert prepared.request.end_id == -1 and prepared.request.stop_sequences == []


def test_default_max_tokens_fits_the_context_window(pipeline):
    assert pipeline.prepare([2] * 10, PredictRequest(prompt="x")).request.max_tokens == 16
    assert pipeline.prepare([2] * 60, PredictRequest(prompt="x")).request.max_tokens == 4


def test_context_window_errors_name_both_numbers(pipeline):
    with pytest.raises(APIError) as err:
        pipeline.prepare([2] * 60, PredictRequest(prompt="x", max_tokens=10))
    assert "60" in err.value.message and "10" in err.value.message and "64" in err.value.message
    with pytest.raises(APIError, match="no room"):
        pipeline.prepare([2] * 64, PredictRequest(prompt="x"))
    with pytest.raises(APIError, match="min_tokens"):
        pipeline.prepare([2], PredictRequest(prompt="x", max_tokens=2, min_tokens=3))
