"""Random layers in a real model's shapes and a float32 PyTorch reference of one batch-1 decode step,
for checking the decode megakernel (`engine/megakernel.py`): `bench/megakernel_probe.py` and
`tests/gpu/test_decode_megakernel.py` use them. The reference rounds where the kernel and the
engine's kernels round (bf16 GEMV inputs, q/k/v after QK-norm and RoPE, the attention output)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from gemma_serve.engine.megakernel import HEAD_DIM, DecodeMegakernel, LayerTensors
from gemma_serve.engine.model_config import ModelConfig
from gemma_serve.engine.models.gemma import RotaryTable

def make_layers(cfg: ModelConfig, n_layers: int, num_blocks: int, block_size: int, max_pos: int,
                device: str, seed: int, window: int | None = None) -> list[LayerTensors]:
    """Random layers in `cfg`'s shapes; `window` overrides the sliding layers' window (checks)."""
    g = torch.Generator(device=device).manual_seed(seed)
    h, inter, nq, nkv = cfg.hidden_size, cfg.intermediate_size, cfg.num_heads, cfg.num_kv_heads

    def w(n: int, k: int) -> torch.Tensor:
        return (torch.randn(n, k, generator=g, device=device) / math.sqrt(k)).to(torch.bfloat16)

    def norm(n: int) -> torch.Tensor:
        return torch.randn(n, generator=g, device=device) * 0.1

    rope_g = RotaryTable(HEAD_DIM, cfg.rope_theta, cfg.rope_scaling_factor, max_pos).to(device)
    rope_l = RotaryTable(HEAD_DIM, cfg.rope_local_theta, 1.0, max_pos).to(device)
    rope_g.init_tables()
    rope_l.init_tables()
    layers = []
    for i in range(n_layers):
        sliding = cfg.sliding[i]
        rope = rope_l if sliding else rope_g
        cache = (num_blocks, block_size, nkv, HEAD_DIM)
        layers.append(LayerTensors(
            qkv=w((nq + 2 * nkv) * HEAD_DIM, h), o=w(h, nq * HEAD_DIM), gate_up=w(2 * inter, h), down=w(h, inter),
            input_norm=norm(h), post_attn_norm=norm(h), pre_ffn_norm=norm(h), post_ffn_norm=norm(h),
            q_norm=norm(HEAD_DIM), k_norm=norm(HEAD_DIM),
            k_cache=torch.randn(cache, generator=g, device=device).to(torch.bfloat16),
            v_cache=torch.randn(cache, generator=g, device=device).to(torch.bfloat16),
            cos=rope.cos, sin=rope.sin, window=(window or cfg.sliding_window or 0) if sliding else 0))
    return layers


def rms(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * (1.0 + w)


def bf(x: torch.Tensor) -> torch.Tensor:
    return x.to(torch.bfloat16).float()


def reference(layers: list[LayerTensors], cfg: ModelConfig, hidden: torch.Tensor, ctx: int, table: torch.Tensor,
              block_size: int) -> tuple[torch.Tensor, list[tuple[torch.Tensor, torch.Tensor]]]:
    """float32 PyTorch, rounding where the kernel rounds; returns the residual and each layer's new k, v."""
    eps, nq, nkv = cfg.rms_norm_eps, cfg.num_heads, cfg.num_kv_heads
    scale = cfg.query_pre_attn_scalar ** -0.5
    pos = ctx - 1
    h2 = hidden.clone()
    h1 = down_out = None
    new_kv = []
    for i, t in enumerate(layers):
        if i > 0:
            h2 = h1 + rms(down_out, layers[i - 1].post_ffn_norm, eps)
        x = bf(rms(h2, t.input_norm, eps))
        qkv = t.qkv.float() @ x
        q = qkv[: nq * HEAD_DIM].view(nq, HEAD_DIM)
        k = qkv[nq * HEAD_DIM:(nq + nkv) * HEAD_DIM].view(nkv, HEAD_DIM)
        v = qkv[(nq + nkv) * HEAD_DIM:].view(nkv, HEAD_DIM)
        c, s = t.cos[pos], t.sin[pos]

        def rope(y: torch.Tensor) -> torch.Tensor:
            half = HEAD_DIM // 2
            rot = torch.cat([-y[..., half:], y[..., :half]], -1)
            return y * c + rot * s

        q = bf(rope(rms(q, t.q_norm, eps)))
        k = bf(rope(rms(k, t.k_norm, eps)))
        v = bf(v)
        new_kv.append((k, v))
        start = max(0, ctx - t.window) if t.window else 0
        positions = torch.arange(start, ctx, device=hidden.device)
        slots = table[positions // block_size].long() * block_size + positions % block_size
        keys = t.k_cache.view(-1, nkv, HEAD_DIM)[slots].float()
        vals = t.v_cache.view(-1, nkv, HEAD_DIM)[slots].float()
        keys[-1], vals[-1] = k, v
        kv_of_q = torch.arange(nq, device=hidden.device) // (nq // nkv)
        scores = torch.einsum("hd,nhd->hn", q, keys[:, kv_of_q]) * scale
        if cfg.attn_logit_softcapping:
            scores = torch.tanh(scores / cfg.attn_logit_softcapping) * cfg.attn_logit_softcapping
        attn = bf(torch.einsum("hn,nhd->hd", scores.softmax(-1), vals[:, kv_of_q]).reshape(-1))
        o = t.o.float() @ attn
        h1 = h2 + rms(o, t.post_attn_norm, eps)
        x = bf(rms(h1, t.pre_ffn_norm, eps))
        gu = t.gate_up.float() @ x
        gate, up = gu.chunk(2)
        act = bf(F.gelu(gate, approximate="tanh") * up)
        down_out = t.down.float() @ act
    out = h1 + rms(down_out, layers[-1].post_ffn_norm, eps)
    return out, new_kv


def check(mk: DecodeMegakernel, layers: list[LayerTensors], cfg: ModelConfig, ctx: int, table: torch.Tensor,
          block_size: int, device: str) -> dict:
    hidden = torch.randn(cfg.hidden_size, device=device) * 3.0
    ctx_t = torch.tensor([ctx], dtype=torch.int32, device=device)
    ref, new_kv = reference(layers, cfg, hidden, ctx, table, block_size)
    got = mk.step(hidden, ctx_t, table).clone()
    torch.cuda.synchronize()
    pos = ctx - 1
    slot = int(table[pos // block_size]) * block_size + pos % block_size
    kv_err = 0.0
    for t, (k, v) in zip(layers, new_kv):
        kc = t.k_cache.view(-1, cfg.num_kv_heads, HEAD_DIM)[slot].float()
        vc = t.v_cache.view(-1, cfg.num_kv_heads, HEAD_DIM)[slot].float()
        kv_err = max(kv_err, (kc - k).abs().max().item() / k.abs().max().item(),
                     (vc - v).abs().max().item() / v.abs().max().item())
    err = (got - ref).abs().max().item() / ref.abs().max().item()
    cos = F.cosine_similarity(got, ref, dim=0).item()
    return dict(ctx=ctx, layers=len(layers), rel_max_err=err, cosine=cos, kv_rel_max_err=kv_err,
                finite=bool(torch.isfinite(got).all()))
