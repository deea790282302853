"""The tiny Gemma that `make serve` and the tests use: deterministic, loadable like a real one."""

import pytest

from gemma_serve import tiny_model
from gemma_serve.tiny_model import make_tiny_gemma


def test_deterministic_bytes(tmp_path):
    a = make_tiny_gemma(tmp_path / "a")
    b = make_tiny_gemma(tmp_path / "b")
    files = sorted(p.name for p in a.iterdir())
    assert "model.safetensors" in files and "tokenizer.json" in files and "config.json" in files
    for name in files:
        assert (a / name).read_bytes() == (b / name).read_bytes(), name


def test_loads_with_transformers(tiny_model_dir):
    import torch
    from transformers import AutoConfig, AutoTokenizer, Gemma3ForConditionalGeneration

    config = AutoConfig.from_pretrained(tiny_model_dir)
    assert config.model_type == "gemma3" and config.image_token_index == tiny_model.IMAGE_TOKEN
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    assert len(tokenizer) == config.text_config.vocab_size
    model = Gemma3ForConditionalGeneration.from_pretrained(tiny_model_dir)
    with torch.no_grad():
        logits = model(torch.tensor([tokenizer("hello world")["input_ids"]])).logits
    assert logits.shape[-1] == config.text_config.vocab_size and torch.isfinite(logits).all()


@pytest.mark.parametrize("text", ["Hello world, this is a test.", "café naïve 東京 🦊🚀 ok",
                                  "  two  spaces\nand lines\n", "unseen: ЖЖЖ ⌘ 𝔘"])
def test_tokenizer_round_trips_any_text(tiny_tokenizer, text):
    ids = tiny_tokenizer.encode_prompt(text)
    assert ids[0] == tiny_model.BOS
    assert tiny_tokenizer.decode(ids) == text


def test_special_tokens_are_single_tokens(tiny_tokenizer):
    hf = tiny_tokenizer.hf
    for i, token in enumerate(tiny_model.SPECIAL_TOKENS):
        assert hf.convert_tokens_to_ids(token) == i
        assert hf(token, add_special_tokens=False)["input_ids"] == [i]
    assert tiny_tokenizer.info.stop_ids == [tiny_model.EOS, tiny_model.END_OF_TURN]


def test_chat_template_renders_gemmas_format(tiny_tokenizer):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": [
                    {"type": "text", "text": "What is "}, {"type": "text", "text": "2+2?"}]}]
    assert tiny_tokenizer.render_chat(messages) == (
        "<bos><start_of_turn>user\nBe brief.\n\nHi<end_of_turn>\n"
        "<start_of_turn>model\nHello!<end_of_turn>\n"
        "<start_of_turn>user\nWhat is2+2?<end_of_turn>\n"
        "<start_of_turn>model\n")
    ids = tiny_tokenizer.encode_chat(messages[1:2])
    assert ids[:3] == [tiny_model.BOS, tiny_model.START_OF_TURN, *tiny_tokenizer.hf("user", add_special_tokens=False)["input_ids"][:1]]
    assert ids.count(tiny_model.BOS) == 1


def test_bad_role_order_is_refused(tiny_tokenizer):
    from gemma_serve.api.errors import APIError

    with pytest.raises(APIError, match="alternate"):
        tiny_tokenizer.render_chat([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}])


def test_engine_serves_it_with_varied_greedy_text(tiny_model_dir, tiny_tokenizer):
    from gemma_serve.engine.config import EngineConfig
    from gemma_serve.engine.llm_engine import LLMEngine
    from gemma_serve.engine.sampling_params import SamplingParams

    engine = LLMEngine(EngineConfig(model=str(tiny_model_dir), device="cpu", num_kv_blocks=64))
    out = engine.generate([tiny_tokenizer.encode_prompt("Once upon a time")],
                          SamplingParams(max_tokens=24, temperature=0.0))[0]
    assert len(set(out)) > 4
