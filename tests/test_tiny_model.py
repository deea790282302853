"""The tiny Gemma 3 that `make serve` and the tests use: deterministic, and loadable like google/gemma-3-4b-it."""

import json
import os
import random
import subprocess
import sys

import pytest
import torch
from gemma_serve import tiny_model
from gemma_serve.tiny_model import FILES, make_tiny_gemma

SPECIAL_IDS = {
    "<pad>": tiny_model.PAD, "<eos>": tiny_model.EOS, "<bos>": tiny_model.BOS, "<unk>": tiny_model.UNK,
    "<mask>": tiny_model.MASK, "<start_of_turn>": tiny_model.START_OF_TURN, "<end_of_turn>": tiny_model.END_OF_TURN,
    "<start_of_image>": tiny_model.START_OF_IMAGE, "<end_of_image>": tiny_model.END_OF_IMAGE,
    "<image_soft_token>": tiny_model.IMAGE_TOKEN,
}
CONVERSATION = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Hi there!"},
    {"role": "assistant", "content": "Hello."},
    {"role": "user", "content": [{"type": "text", "text": "What is in "}, {"type": "image"},
                                 {"type": "text", "text": "this picture?"}]},
]
EXPECTED_CHAT = (
    "<bos><start_of_turn>user\nYou are terse.\n\nHi there!<end_of_turn>\n"
    "<start_of_turn>model\nHello.<end_of_turn>\n"
    "<start_of_turn>user\nWhat is in<start_of_image>this picture?<end_of_turn>\n"
    "<start_of_turn>model\n"
)


@pytest.fixture(scope="module")
def hf_tokenizer(tiny_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tiny_model_dir))


@pytest.fixture(scope="module")
def hf_model(tiny_model_dir):
    from transformers import Gemma3ForConditionalGeneration

    return Gemma3ForConditionalGeneration.from_pretrained(str(tiny_model_dir)).eval()


# --- files -------------------------------------------------------------------------------------------

def test_files_are_byte_identical_across_runs_and_processes(tmp_path):
    a = make_tiny_gemma(tmp_path / "a")
    # A second run in a fresh process (other hash seed), through the module's CLI.
    env = {**os.environ, "PYTHONHASHSEED": "123", "PYTHONPATH": os.pathsep.join(sys.path)}
    subprocess.run([sys.executable, "-m", "gemma_serve.tiny_model", str(tmp_path / "b")], check=True, env=env,
                   capture_output=True, timeout=300)
    b = tmp_path / "b"
    assert sorted(p.name for p in a.iterdir()) == sorted(FILES) == sorted(p.name for p in b.iterdir())
    for name in FILES:
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
    assert (a / "chat_template.jinja").read_text() == tiny_model.CHAT_TEMPLATE.read_text()


def test_reuses_a_current_checkpoint_and_rebuilds_a_stale_one(tmp_path):
    out = make_tiny_gemma(tmp_path / "m")
    weights = out / "model.safetensors"
    before = weights.stat().st_mtime_ns
    assert make_tiny_gemma(out) == out and weights.stat().st_mtime_ns == before  # reused
    config = (out / "config.json").read_bytes()
    (out / "config.json").write_text("{}")
    make_tiny_gemma(out)  # stale: rebuilt
    assert (out / "config.json").read_bytes() == config
    data = weights.read_bytes()
    assert make_tiny_gemma(out, force=True) == out and weights.read_bytes() == data


def test_refuses_to_replace_a_folder_that_is_not_a_tiny_checkpoint(tmp_path):
    (tmp_path / "keep.txt").write_text("precious")
    with pytest.raises(FileExistsError):
        make_tiny_gemma(tmp_path, force=True)
    assert (tmp_path / "keep.txt").read_text() == "precious"


def test_config_has_the_published_gemma3_layout(tiny_model_dir):
    from safetensors import safe_open

    raw = json.loads((tiny_model_dir / "config.json").read_text())
    assert raw["architectures"] == ["Gemma3ForConditionalGeneration"] and raw["model_type"] == "gemma3"
    assert {"rope_theta", "rope_local_base_freq", "sliding_window_pattern"} <= raw["text_config"].keys()
    generation = json.loads((tiny_model_dir / "generation_config.json").read_text())
    assert generation["eos_token_id"] == [tiny_model.EOS, tiny_model.END_OF_TURN]
    assert (generation["bos_token_id"], generation["pad_token_id"]) == (tiny_model.BOS, tiny_model.PAD)
    with safe_open(str(tiny_model_dir / "model.safetensors"), "pt") as f:
        names = list(f.keys())
    assert "language_model.model.embed_tokens.weight" in names
    assert "vision_tower.vision_model.post_layernorm.weight" in names
    assert "multi_modal_projector.mm_input_projection_weight" in names
    assert all(n.startswith(("language_model.model.", "vision_tower.vision_model.", "multi_modal_projector."))
               for n in names)


# --- loading with transformers -----------------------------------------------------------------------

def test_loads_with_transformers_auto_classes(tiny_model_dir, hf_tokenizer):
    from transformers import AutoConfig, Gemma3ForConditionalGeneration

    config = AutoConfig.from_pretrained(str(tiny_model_dir))
    text = config.text_config
    assert config.model_type == "gemma3" and text.model_type == "gemma3_text"
    assert set(text.layer_types) == {"sliding_attention", "full_attention"}
    assert text.rope_parameters["full_attention"]["rope_theta"] == 1e6
    assert text.rope_parameters["sliding_attention"]["rope_theta"] == 1e4
    assert (config.image_token_index, config.boi_token_index, config.eoi_token_index) == (
        tiny_model.IMAGE_TOKEN, tiny_model.START_OF_IMAGE, tiny_model.END_OF_IMAGE)
    assert config.mm_tokens_per_image == 64 and config.vision_config.image_size // config.vision_config.patch_size == 16
    assert config.eos_token_id == [tiny_model.EOS, tiny_model.END_OF_TURN]
    assert type(hf_tokenizer).__name__ == "GemmaTokenizer"
    assert len(hf_tokenizer) == text.vocab_size == tiny_model.VOCAB_SIZE
    model, info = Gemma3ForConditionalGeneration.from_pretrained(str(tiny_model_dir), output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    assert model.dtype == torch.float32


# --- tokenizer ---------------------------------------------------------------------------------------

TEXTS = ["Hello world, this is a test.", "", " ", "  two  spaces, trailing  ", "\n\nnew\nlines\n", "\ttabs\t",
         "café naïve résumé — “quoted”", "東京 北京 こんにちは 안녕하세요", "emoji 🦊🚀✨ 👋🏽 ❤️ 👨‍👩‍👧", "unseen: ЖЖЖ ⌘ 𝔘 \x00\x7f",
         "numbers 1234567890 and symbols {}[]()<>", "not special: <0x41> <start_of_turn", "def f(x):\n    return x"]


@pytest.mark.parametrize("text", TEXTS)
def test_tokenizer_round_trips_text(hf_tokenizer, tiny_model_dir, text):
    from tokenizers import Tokenizer

    ids = hf_tokenizer(text)["input_ids"]
    assert ids[0] == tiny_model.BOS and ids.count(tiny_model.BOS) == 1
    assert hf_tokenizer.decode(ids, skip_special_tokens=True) == text
    raw = Tokenizer.from_file(str(tiny_model_dir / "tokenizer.json"))  # the file alone gives the same ids
    assert raw.encode(text).ids == ids


def test_tokenizer_round_trips_random_unicode(hf_tokenizer):
    rng = random.Random(0)
    ranges = [(0x20, 0x7E), (0xA0, 0x24F), (0x370, 0x4FF), (0x3040, 0x30FF), (0x4E00, 0x9FFF), (0x1F300, 0x1FAFF)]
    for _ in range(50):
        text = "".join(chr(rng.randint(*rng.choice(ranges))) for _ in range(rng.randint(1, 40)))
        text = text.replace("▁", "_")  # Gemma's space marker itself decodes to a space
        ids = hf_tokenizer(text, add_special_tokens=False)["input_ids"]
        assert hf_tokenizer.decode(ids) == text


def test_multibyte_characters_outside_the_alphabet_use_byte_tokens(hf_tokenizer):
    for char in ["東", "🦊", "Ж"]:
        ids = hf_tokenizer(char, add_special_tokens=False)["input_ids"]
        assert ids == [tiny_model.FIRST_BYTE_ID + b for b in char.encode("utf-8")]
    assert hf_tokenizer.convert_ids_to_tokens(tiny_model.FIRST_BYTE_ID + 0x41) == "<0x41>"
    assert len(hf_tokenizer(" the", add_special_tokens=False)["input_ids"]) == 1  # merges were learned


def test_special_tokens_have_the_fixed_ids_and_encode_as_one_token(hf_tokenizer):
    for token, token_id in SPECIAL_IDS.items():
        assert hf_tokenizer.convert_tokens_to_ids(token) == token_id
        assert hf_tokenizer(token, add_special_tokens=False)["input_ids"] == [token_id]
        assert hf_tokenizer(f"a{token}b", add_special_tokens=False)["input_ids"][1] == token_id
    assert (hf_tokenizer.pad_token_id, hf_tokenizer.eos_token_id, hf_tokenizer.bos_token_id,
            hf_tokenizer.unk_token_id) == (tiny_model.PAD, tiny_model.EOS, tiny_model.BOS, tiny_model.UNK)
    assert hf_tokenizer.image_token_id == tiny_model.IMAGE_TOKEN
    assert hf_tokenizer.decode([tiny_model.BOS, tiny_model.START_OF_TURN, tiny_model.END_OF_TURN],
                               skip_special_tokens=True) == ""


def test_serving_tokenizer_sees_both_stop_ids(tiny_tokenizer):
    assert tiny_tokenizer.info.stop_ids == [tiny_model.EOS, tiny_model.END_OF_TURN]
    assert tiny_tokenizer.info.bos_id == tiny_model.BOS and tiny_tokenizer.info.pad_id == tiny_model.PAD


# --- chat template -----------------------------------------------------------------------------------

def test_chat_template_renders_the_gemma3_format(hf_tokenizer):
    assert hf_tokenizer.chat_template == tiny_model.CHAT_TEMPLATE.read_text()
    assert hf_tokenizer.apply_chat_template(CONVERSATION, tokenize=False, add_generation_prompt=True) == EXPECTED_CHAT
    assert hf_tokenizer.apply_chat_template(CONVERSATION[1:2], tokenize=False) == (
        "<bos><start_of_turn>user\nHi there!<end_of_turn>\n")
    ids = hf_tokenizer(EXPECTED_CHAT, add_special_tokens=False)["input_ids"]
    assert ids[:2] == [tiny_model.BOS, tiny_model.START_OF_TURN] and ids.count(tiny_model.BOS) == 1
    assert ids.count(tiny_model.END_OF_TURN) == 3 and ids.count(tiny_model.START_OF_IMAGE) == 1


def test_fallback_template_renders_the_same(tiny_tokenizer):
    from gemma_serve.api.tokenizer import FALLBACK_TEMPLATE, Tokenizer

    assert FALLBACK_TEMPLATE.read_text() == tiny_model.CHAT_TEMPLATE.read_text()
    hf = tiny_tokenizer.hf
    template, hf.chat_template = hf.chat_template, None
    try:
        assert Tokenizer(hf, tiny_tokenizer.info).render_chat(CONVERSATION) == EXPECTED_CHAT
    finally:
        hf.chat_template = template


@pytest.mark.parametrize("roles", [["user", "user"], ["assistant"], ["system", "assistant"],
                                   ["user", "assistant", "assistant"], ["user", "system"],
                                   ["system", "system", "user"], ["user", "tool"]])
def test_bad_role_order_raises(hf_tokenizer, roles):
    from jinja2.exceptions import TemplateError

    messages = [{"role": role, "content": "x"} for role in roles]
    with pytest.raises(TemplateError, match="roles must alternate"):
        hf_tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def test_bad_role_order_is_a_400_in_the_api(tiny_tokenizer):
    from gemma_serve.api.errors import APIError

    with pytest.raises(APIError, match="alternate"):
        tiny_tokenizer.render_chat([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}])


# --- model -------------------------------------------------------------------------------------------

def test_forward_pass_text_and_image(hf_model, hf_tokenizer):
    ids = torch.tensor([hf_tokenizer("The capital of France is")["input_ids"]])
    with torch.no_grad():
        logits = hf_model(input_ids=ids).logits
    assert logits.shape == (1, ids.shape[1], tiny_model.VOCAB_SIZE) and torch.isfinite(logits).all()

    prompt = EXPECTED_CHAT.replace("<start_of_image>", "<start_of_image>" + "<image_soft_token>" * 64 + "<end_of_image>")
    ids = torch.tensor([hf_tokenizer(prompt, add_special_tokens=False)["input_ids"]])
    pixels = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        with_image = hf_model(input_ids=ids, pixel_values=pixels, token_type_ids=(ids == tiny_model.IMAGE_TOKEN).long())
        other_image = hf_model(input_ids=ids, pixel_values=-pixels,
                               token_type_ids=(ids == tiny_model.IMAGE_TOKEN).long())
    assert torch.isfinite(with_image.logits).all()
    assert not torch.equal(with_image.logits[0, -1], other_image.logits[0, -1])  # the image is seen


@pytest.mark.parametrize("prompt", ["Once upon a time", "The capital of France is", "café 🦊", "Hello"])
def test_greedy_text_varies_and_does_not_stop_at_once(hf_model, hf_tokenizer, prompt):
    ids = torch.tensor([hf_tokenizer(prompt)["input_ids"]])
    out = hf_model.generate(ids, max_new_tokens=24, do_sample=False)[0, ids.shape[1]:].tolist()
    assert len(out) == 24 and tiny_model.EOS not in out[:4] and tiny_model.END_OF_TURN not in out[:4]
    assert len(set(out)) > 8


def test_portable_engine_matches_transformers(tiny_model_dir, hf_model, hf_tokenizer):
    from gemma_serve.engine.config import EngineConfig
    from gemma_serve.engine.llm_engine import LLMEngine
    from gemma_serve.engine.sampling_params import SamplingParams

    engine = LLMEngine(EngineConfig(model=str(tiny_model_dir), device="cpu", dtype="float32", num_kv_blocks=64))
    prompt = hf_tokenizer.apply_chat_template(CONVERSATION[:2], tokenize=False, add_generation_prompt=True)
    ids = hf_tokenizer(prompt, add_special_tokens=False)["input_ids"]
    ours = engine.generate([ids], SamplingParams(max_tokens=16, temperature=0.0))[0]
    theirs = hf_model.generate(torch.tensor([ids]), max_new_tokens=16, do_sample=False)[0, len(ids):].tolist()
    assert list(ours) == theirs


def test_processor_loads_where_an_image_backend_is_installed(tiny_model_dir):
    pytest.importorskip("PIL", reason="the Gemma 3 image processor needs Pillow or torchvision")
    import numpy as np
    from PIL import Image
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(str(tiny_model_dir))
    image = Image.fromarray(np.zeros((300, 400, 3), dtype=np.uint8))
    text = processor.apply_chat_template(CONVERSATION, tokenize=False, add_generation_prompt=True)
    batch = processor(text=text, images=[image], return_tensors="pt")
    assert batch["pixel_values"].shape == (1, 3, 224, 224)
    assert int((batch["input_ids"] == tiny_model.IMAGE_TOKEN).sum()) == tiny_model.MM_TOKENS_PER_IMAGE
