import numpy as np
import pytest

from gemma_serve.triton import contract
from gemma_serve.triton.contract import GenerationRequest


def test_word_list_round_trip():
    words = [[5, 6], [7], [8, 9, 10]]
    array = contract.encode_word_list(words)
    assert array.shape == (2, 6)
    assert array[1].tolist()[:3] == [2, 3, 6]
    assert contract.decode_word_list(array) == words


def test_request_round_trips_through_tensors():
    request = GenerationRequest(
        input_ids=[2, 10, 11, 12], max_tokens=7, end_id=1, pad_id=0, temperature=0.75, top_k=5, top_p=0.875,
        repetition_penalty=1.125, presence_penalty=0.5, frequency_penalty=-0.5, seed=1234, min_tokens=2,
        stop_sequences=[[106], [50, 51]], bad_sequences=[[3]], logprobs=True,
    )
    tensors = contract.to_tensors(request)
    # Every tensor has the batch dimension and the contract's dtype.
    specs = {s.name: s for s in contract.INPUTS}
    for name, array in tensors.items():
        assert array.dtype == specs[name].numpy_dtype, name
        assert array.shape[0] == 1 and array.ndim == len(specs[name].dims) + 1, name
    back = contract.from_tensors(tensors)
    assert back == request


def test_optional_tensors_take_defaults_and_required_are_enforced():
    request = contract.from_tensors({
        "input_ids": np.array([[1, 2, 3]], np.int32),
        "input_lengths": np.array([[3]], np.int32),
        "request_output_len": np.array([[4]], np.int32),
    })
    assert request.seed is None and request.top_k == 0 and request.stop_sequences == []
    with pytest.raises(ValueError, match="request_output_len"):
        contract.from_tensors({"input_ids": np.array([[1]], np.int32), "input_lengths": np.array([[1]], np.int32)})
    with pytest.raises(ValueError, match="unknown input"):
        contract.from_tensors({"input_ids": np.array([[1]], np.int32), "input_lengths": np.array([[1]], np.int32),
                               "request_output_len": np.array([[1]], np.int32), "bogus": np.array([[1]])})


def test_output_chunk_round_trip():
    chunk = contract.TokenChunk([4, 5, 6], 10, [-0.1, -0.2, -0.3])
    tensors = contract.chunk_to_tensors(chunk)
    back = contract.chunk_from_tensors(tensors["output_ids"], tensors["sequence_length"], tensors["output_log_probs"])
    assert back.token_ids == [4, 5, 6] and back.sequence_length == 10
    assert np.allclose(back.logprobs, chunk.logprobs)


def test_images_round_trip_through_tensors():
    pixels = np.random.default_rng(0).standard_normal((2, 3, 8, 8)).astype(np.float32)
    request = GenerationRequest(input_ids=[2, 7, 9, 9, 8], max_tokens=3, end_id=1,
                                pixel_values=pixels, image_hashes=["ab" * 32, "cd" * 32])
    tensors = contract.to_tensors(request)
    assert tensors["pixel_values"].shape == (1, 2, 3, 8, 8)
    assert tensors["image_hashes"].dtype == object and tensors["image_hashes"].shape == (1, 2)
    back = contract.from_tensors(tensors)
    assert back.num_images == 2 and back.image_hashes == request.image_hashes
    assert np.array_equal(back.pixel_values, pixels)
    # A text request sends no image tensors at all (so the TensorRT-LLM model never sees them).
    assert "pixel_values" not in contract.to_tensors(GenerationRequest(input_ids=[1], max_tokens=1, end_id=1))


def test_image_tensors_must_agree():
    base = {"input_ids": np.array([[1, 2]], np.int32), "input_lengths": np.array([[2]], np.int32),
            "request_output_len": np.array([[1]], np.int32)}
    pixels = np.zeros((1, 2, 3, 4, 4), np.float32)
    with pytest.raises(ValueError, match="image_hashes"):
        contract.from_tensors({**base, "pixel_values": pixels,
                               "image_hashes": np.array([[b"a"]], dtype=object)})
    with pytest.raises(ValueError, match=r"\[images, 3"):
        contract.from_tensors({**base, "pixel_values": np.zeros((1, 2, 4, 4), np.float32)})
    with pytest.raises(ValueError, match="without pixel_values"):
        contract.from_tensors({**base, "image_hashes": np.array([[b"a"]], dtype=object)})
