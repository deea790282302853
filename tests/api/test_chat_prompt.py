"""Chat messages -> prompt ids and images, and the 400 a deployment without image support gives."""

import pytest

from gemma_serve.api.chat_prompt import ChatPromptBuilder, ImageSupport
from gemma_serve.api.errors import APIError
from gemma_serve.api.images import ImageLimits
from gemma_serve.api.schemas import Message
from gemma_serve.tiny_model import MM_TOKENS_PER_IMAGE

PNG_1x1 = ("data:image/png;base64,iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAIAAACQd1PeAAAADElEQVR4nGP4z8AAAAMBAQDJ/pLvAAAAAElFTkSuQmCC")


def image_chat() -> list[Message]:
    return [Message.model_validate({"role": "user", "content": [
        {"type": "text", "text": "what is it?"}, {"type": "image_url", "image_url": {"url": PNG_1x1}}]})]


async def test_text_only_deployment_refuses_images_saying_why(tiny_tokenizer):
    builder = ChatPromptBuilder(tiny_tokenizer, None, "the TensorRT-LLM engine serves text only")
    with pytest.raises(APIError) as info:
        await builder.build(image_chat())
    assert info.value.status == 400 and "TensorRT-LLM engine serves text only" in info.value.message
    assert info.value.param == "messages.0.content.1"
    text = await builder.build([Message(role="developer", content="be brief"), Message(role="user", content="hi")])
    assert text.images == [] and text.ids == tiny_tokenizer.encode_chat(
        [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}])


async def test_image_deployment_expands_the_image_tokens(tiny_model_dir, tiny_tokenizer):
    support = ImageSupport.from_checkpoint(tiny_model_dir, tiny_tokenizer, ImageLimits())
    assert support is not None
    prompt = await ChatPromptBuilder(tiny_tokenizer, support, "").build(image_chat())
    assert len(prompt.images) == 1 and prompt.images[0].pixel_values.shape[0] == 3
    layout = support.layout
    assert prompt.ids.count(layout.image_id) == MM_TOKENS_PER_IMAGE
    assert prompt.ids.count(layout.boi_id) == 1 and prompt.ids.count(layout.eoi_id) == 1


def test_checkpoints_without_a_vision_tower_have_no_image_support(tmp_path, tiny_tokenizer):
    (tmp_path / "config.json").write_text('{"model_type": "gemma2"}')
    assert ImageSupport.from_checkpoint(tmp_path, tiny_tokenizer, ImageLimits()) is None
