import json

import pytest
from gemma_serve.bench.endpoints import get_endpoint, join_url
from gemma_serve.bench.workload import WORDS_PER_TOKEN, WorkloadGenerator, load_tokenizer, read_dataset


def test_random_prompts_repeat_with_the_seed():
    a = WorkloadGenerator(64, seed=7).prompts(5)
    assert a == WorkloadGenerator(64, seed=7).prompts(5)
    assert a != WorkloadGenerator(64, seed=8).prompts(5)
    assert len({p.text for p in a}) == 5  # no shared prompts for a prefix cache to reuse
    assert all(len(p.text.split()) == round(64 * WORDS_PER_TOKEN) and p.input_tokens == 64 and not p.exact
               for p in a)


def test_dataset_rows_prompt_and_messages(tmp_path):
    path = tmp_path / "d.jsonl"
    rows = [{"prompt": "one two three"}, {"messages": [{"role": "user", "content": "four five"}]}, {}]
    path.write_text("\n".join(json.dumps(r) for r in rows[:2]) + "\n\n")
    data = read_dataset(path)
    prompts = WorkloadGenerator(seed=0, dataset=data).prompts(5)  # cycles past the two rows
    assert prompts == WorkloadGenerator(seed=0, dataset=data).prompts(5)
    assert {p.as_text() for p in prompts} == {"one two three", "four five"}
    chat = next(p for p in prompts if p.messages)
    assert chat.as_messages() == [{"role": "user", "content": "four five"}]
    assert get_endpoint("predict").body(chat, None, 4, False)["messages"] == chat.as_messages()
    assert get_endpoint("completions").body(chat, "m", 4, False)["prompt"] == "four five"
    path.write_text(json.dumps(rows[2]) + "\n")
    with pytest.raises(ValueError, match="prompt"):
        read_dataset(path)


def test_join_url_takes_root_or_v1():
    assert join_url("http://h:1/", "/v1/completions") == "http://h:1/v1/completions"
    assert join_url("http://h:1/v1", "/v1/models/model:predict") == "http://h:1/v1/models/model:predict"


def test_exact_lengths_with_a_tokenizer(tiny_model_dir):
    tokenizer = load_tokenizer(str(tiny_model_dir))  # AutoTokenizer on a real BPE tokenizer folder
    prompts = WorkloadGenerator(50, seed=3, tokenizer=tokenizer).prompts(4)
    for p in prompts:
        assert p.exact and p.input_tokens == 50
        assert len(tokenizer.encode(p.text, add_special_tokens=False)) == 50


def test_image_prompts_are_seeded_distinct_and_sent_as_image_parts(tmp_path):
    from gemma_serve.bench.workload import ImageSource

    a = WorkloadGenerator(16, seed=3, images_per_request=2, image_source=ImageSource(size=32, seed=3)).prompts(3)
    assert a == WorkloadGenerator(16, seed=3, images_per_request=2,
                                  image_source=ImageSource(size=32, seed=3)).prompts(3)
    urls = [u for p in a for u in p.images]
    assert len(urls) == 6 and len(set(urls)) == 6 and all(u.startswith("data:image/png;base64,") for u in urls)
    body = get_endpoint("chat").body(a[0], "m", 4, False)
    parts = body["messages"][-1]["content"]
    assert parts[0] == {"type": "text", "text": a[0].text}
    assert [p["image_url"]["url"] for p in parts[1:]] == list(a[0].images)
    # A folder of images, cycled in a seeded order.
    for name in ("b.png", "a.jpg", "notes.txt"):
        (tmp_path / name).write_bytes(ImageSource(size=8).generate(len(name)))
    source = ImageSource(tmp_path, seed=0)
    assert len(source.files) == 2 and source.data_url(0) == source.data_url(2)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no images"):
        ImageSource(tmp_path / "empty")
