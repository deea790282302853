"""The float32 reference that the decode megakernel is checked against on the GPU
(`gemma_serve.bench.megakernel_reference`, tests/gpu/test_decode_megakernel.py) must compute what
the engine computes. Here the engine's own GemmaLayers (float32 residual stream, float32 matmul
outputs, as ModelRunner sets them) run one batch-1 decode step on CPU with the same random weights
and paged caches, in Gemma 3 4B's shapes: one sliding-window layer (window 40, so it binds) and one
global layer. The residual after both layers and the new token's cached key and value must agree."""

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from gemma_serve.bench.megakernel_reference import make_layers, reference
from gemma_serve.engine.attention import AttentionMetadata
from gemma_serve.engine.megakernel import HEAD_DIM
from gemma_serve.engine.model_config import ModelConfig
from gemma_serve.engine.models.gemma import GemmaModel
from gemma_serve.engine.quantization import quantize_model

REPO = Path(__file__).resolve().parents[2]
BLOCK = 16


def engine_step(cfg, layers, hidden, ctx, table):
    model = GemmaModel(cfg, max_positions=128)
    model.residual_dtype = torch.float32
    quantize_model(model, "none")
    model.set_matmul_out_dtype(torch.float32)
    with torch.no_grad():
        for layer, t in zip(model.layers, layers):
            layer.qkv_proj.weight.data = t.qkv
            layer.o_proj.weight.data = t.o
            layer.gate_up_proj.weight.data = t.gate_up
            layer.down_proj.weight.data = t.down
            for norm, w in ((layer.input_layernorm, t.input_norm), (layer.post_attention_layernorm, t.post_attn_norm),
                            (layer.pre_feedforward_layernorm, t.pre_ffn_norm),
                            (layer.post_feedforward_layernorm, t.post_ffn_norm), (layer.q_norm, t.q_norm),
                            (layer.k_norm, t.k_norm)):
                norm.weight.data = w.clone()
    pos = ctx - 1
    slot = int(table[pos // BLOCK]) * BLOCK + pos % BLOCK
    meta = AttentionMetadata(
        slot_mapping=torch.tensor([slot]), block_tables=table[None].long(), context_lens=torch.tensor([ctx]),
        query_start=torch.tensor([0, 1]), num_decodes=1, max_decode_context_len=ctx, query_start_host=[0, 1],
        context_lens_host=[ctx])
    positions = torch.tensor([pos])
    rope = {True: model.rope_local(positions), False: model.rope_global(positions)}
    caches = [(t.k_cache.clone(), t.v_cache.clone()) for t in layers]
    with torch.no_grad():
        normed = model.layers[0].input_layernorm(hidden[None], torch.bfloat16)
        h = hidden[None].clone()
        for i, (layer, (kc, vc)) in enumerate(zip(model.layers, caches)):
            cos, sin = (x[:, None, :] for x in rope[layer.sliding])
            nxt = model.layers[i + 1].input_layernorm if i + 1 < len(model.layers) else None
            h, normed = layer(h, normed, cos, sin, kc, vc, meta, nxt)
    return h[0], caches, slot


@pytest.mark.parametrize("ctx", [1, 40, 41, 70])
def test_reference_matches_engine_layers(ctx: int) -> None:
    raw = json.loads((REPO / "bench" / "configs" / "gemma-3-4b-it" / "config.json").read_text())
    # vocab_size: the step never touches the embedding table, and the real one is 2.7 GB in float32.
    cfg = dataclasses.replace(ModelConfig.from_dict(raw), num_layers=2, sliding=(True, False), sliding_window=40,
                              vocab_size=256)
    torch.manual_seed(0)
    layers = make_layers(cfg, 2, num_blocks=8, block_size=BLOCK, max_pos=128, device="cpu", seed=4)
    table = torch.tensor([5, 2, 7, 0, 3], dtype=torch.int32)
    hidden = torch.randn(cfg.hidden_size) * 3.0
    ref, new_kv = reference(layers, cfg, hidden, ctx, table, BLOCK)
    got, caches, slot = engine_step(cfg, layers, hidden, ctx, table)
    assert torch.allclose(got.float(), ref, rtol=0, atol=2e-3 * ref.abs().max().item())
    for (kc, vc), (k, v) in zip(caches, new_kv):
        assert torch.allclose(kc.view(-1, cfg.num_kv_heads, HEAD_DIM)[slot].float(), k, atol=2e-2 * k.abs().max().item())
        assert torch.allclose(vc.view(-1, cfg.num_kv_heads, HEAD_DIM)[slot].float(), v, atol=2e-2 * v.abs().max().item())
