"""Gemma 1, 2 and 3 text decoders, written once.

What differs between generations is data in `ModelConfig`: sandwich norms around attention and MLP
(2, 3), QK-norm (3), attention and final logit soft-capping (2), sliding-window layers with their own
RoPE base (2, 3), linear RoPE scaling of global layers (3). Plain `nn.Linear` layers, so the
quantization module can swap them without the model knowing.

The forward takes a flattened batch: all sequences' new tokens concatenated, with their positions
and the paged-attention metadata, and returns logits only for the rows that will be sampled.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from gemma_serve.engine.attention import AttentionMetadata, paged_attention, write_kv
from gemma_serve.engine.model_config import ModelConfig
from torch import nn

try:  # CUDA builds of PyTorch ship Triton; CPU-only installs use the PyTorch path alone.
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the install
    triton = None


if triton is not None:

    @triton.jit
    def _rms_norm_kernel(X, W, Y, rows_per_t, stride_t, stride_r, eps, DIM: tl.constexpr, BLOCK: tl.constexpr):
        """One row of x ([T, R, DIM] with strided T and R) per program; float32 inside."""
        row = tl.program_id(0)
        t = row // rows_per_t
        r = row % rows_per_t
        cols = tl.arange(0, BLOCK)
        mask = cols < DIM
        x = tl.load(X + t.to(tl.int64) * stride_t + r * stride_r + cols, mask=mask, other=0.0).to(tl.float32)
        inv = tl.math.rsqrt(tl.sum(x * x, axis=0) / DIM + eps)
        w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
        y = (x * inv) * (1.0 + w)
        tl.store(Y + row.to(tl.int64) * DIM + cols, y.to(Y.dtype.element_ty), mask=mask)

    @triton.jit
    def _norm_rope_kernel(X, W, COS, SIN, Y, rows_per_t, stride_t, stride_r, stride_cos, eps,
                          DIM: tl.constexpr, HALF: tl.constexpr):
        """QK-norm then rotary embedding (rotate-half) of one head row: norm output rounded to the
        activations' dtype as the unfused path does, the rotation in float32, rounded once."""
        row = tl.program_id(0)
        t = row // rows_per_t
        r = row % rows_per_t
        cols = tl.arange(0, DIM)
        partner = (cols + HALF) % DIM
        base = X + t.to(tl.int64) * stride_t + r * stride_r
        x = tl.load(base + cols).to(tl.float32)
        xp = tl.load(base + partner).to(tl.float32)
        inv = tl.math.rsqrt(tl.sum(x * x, axis=0) / DIM + eps)
        y = ((x * inv) * (1.0 + tl.load(W + cols).to(tl.float32))).to(Y.dtype.element_ty).to(tl.float32)
        yp = ((xp * inv) * (1.0 + tl.load(W + partner).to(tl.float32))).to(Y.dtype.element_ty).to(tl.float32)
        rotated = tl.where(cols < HALF, -yp, yp)
        c = tl.load(COS + t.to(tl.int64) * stride_cos + cols).to(tl.float32)
        s = tl.load(SIN + t.to(tl.int64) * stride_cos + cols).to(tl.float32)
        out = y * c + rotated * s
        tl.store(Y + row.to(tl.int64) * DIM + cols, out.to(Y.dtype.element_ty))


def _norm_rope_triton(x: torch.Tensor, weight: torch.Tensor, eps: float, cos: torch.Tensor,
                      sin: torch.Tensor) -> torch.Tensor | None:
    """RMSNorm(x) then rotary, fused, for x [T, heads, D] (D a power of two, last dim contiguous) and
    cos/sin [T, 1, D]; None when the layout does not fit."""
    t, r, dim = x.shape
    if x.stride(-1) != 1 or dim & (dim - 1) or cos.stride(-1) != 1 or sin.stride() != cos.stride():
        return None
    y = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    if y.numel():
        _norm_rope_kernel[(t * r,)](x, weight, cos, sin, y, r, x.stride(0), x.stride(1), cos.stride(0), float(eps),
                                    DIM=dim, HALF=dim // 2, num_warps=max(1, min(4, dim // 128)))
    return y


def _use_triton(x: torch.Tensor) -> bool:
    return triton is not None and x.is_cuda


def _rms_norm_triton(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor | None:
    """The fused norm (one kernel instead of ten) for [T, dim] or [T, R, dim] inputs whose last dim is
    contiguous; None when the layout does not fit."""
    dim = x.shape[-1]
    if x.stride(-1) != 1 or x.dim() not in (2, 3):
        return None
    if x.dim() == 2:
        t, r, stride_t, stride_r = x.shape[0], 1, x.stride(0), 0
    else:
        t, r, stride_t, stride_r = x.shape[0], x.shape[1], x.stride(0), x.stride(1)
    y = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    if y.numel():
        block = triton.next_power_of_2(dim)
        _rms_norm_kernel[(t * r,)](x, weight, y, r, stride_t, stride_r, float(eps), DIM=dim, BLOCK=block,
                                   num_warps=max(1, min(8, block // 256)))
    return y


class RMSNorm(nn.Module):
    """Gemma's RMSNorm: computed in float32, scaled by (1 + weight). One Triton kernel on CUDA."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.zeros(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if _use_triton(x):
            y = _rms_norm_triton(x, self.weight, self.eps)
            if y is not None:
                return y
        x32 = x.float()
        out = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return (out * (1.0 + self.weight.float())).to(x.dtype)


class RotaryTable(nn.Module):
    """cos/sin for every position up to `max_positions` (rotate-half layout, as Hugging Face), float32."""

    def __init__(self, head_dim: int, theta: float, scaling: float, max_positions: int) -> None:
        super().__init__()
        self.head_dim, self.theta, self.scaling, self.max_positions = head_dim, theta, scaling, max_positions
        self.register_buffer("cos", torch.empty(max_positions, head_dim, dtype=torch.float32), persistent=False)
        self.register_buffer("sin", torch.empty(max_positions, head_dim, dtype=torch.float32), persistent=False)
        if self.cos.device.type != "meta":
            self.init_tables()

    @torch.no_grad()
    def init_tables(self) -> None:
        """Fill the tables on their device (after `to_empty` when the model was built on "meta")."""
        device = self.cos.device
        exponents = torch.arange(0, self.head_dim, 2, dtype=torch.float32, device=device) / self.head_dim
        inv_freq = 1.0 / (self.theta ** exponents) / self.scaling
        freqs = torch.outer(torch.arange(self.max_positions, dtype=torch.float32, device=device), inv_freq)
        emb = torch.cat([freqs, freqs], dim=-1)
        self.cos.copy_(emb.cos())
        self.sin.copy_(emb.sin())

    def forward(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.cos[positions], self.sin[positions]


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [T, heads, D]; cos/sin: [T, 1, D], already in x's dtype (rounded as Hugging Face does)."""
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin


class GemmaLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, index: int) -> None:
        super().__init__()
        self.cfg = cfg
        self.sliding = cfg.sliding[index]
        h, d = cfg.hidden_size, cfg.head_dim
        self.q_size, self.kv_size = cfg.num_heads * d, cfg.num_kv_heads * d
        self.input_layernorm = RMSNorm(h, cfg.rms_norm_eps)
        self.qkv_proj = nn.Linear(h, self.q_size + 2 * self.kv_size, bias=False)
        self.o_proj = nn.Linear(self.q_size, h, bias=False)
        self.gate_up_proj = nn.Linear(h, 2 * cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, h, bias=False)
        # Gemma 1 calls its pre-MLP norm post_attention_layernorm; Gemma 2/3 use that name for the
        # norm after attention and add pre/post feed-forward norms.
        self.post_attention_layernorm = RMSNorm(h, cfg.rms_norm_eps)
        if cfg.sandwich_norms:
            self.pre_feedforward_layernorm = RMSNorm(h, cfg.rms_norm_eps)
            self.post_feedforward_layernorm = RMSNorm(h, cfg.rms_norm_eps)
        if cfg.qk_norm:
            self.q_norm = RMSNorm(d, cfg.rms_norm_eps)
            self.k_norm = RMSNorm(d, cfg.rms_norm_eps)
        self.scale = cfg.query_pre_attn_scalar ** -0.5
        self.window = cfg.sliding_window if self.sliding else None

    def forward(self, hidden: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, k_cache: torch.Tensor,
                v_cache: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        cfg = self.cfg
        tokens = hidden.shape[0]
        residual = hidden
        qkv = self.qkv_proj(self.input_layernorm(hidden))
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = q.view(tokens, cfg.num_heads, cfg.head_dim)
        k = k.view(tokens, cfg.num_kv_heads, cfg.head_dim)
        v = v.view(tokens, cfg.num_kv_heads, cfg.head_dim)
        fused = None
        if cfg.qk_norm and _use_triton(hidden):
            fused = (_norm_rope_triton(q, self.q_norm.weight, self.q_norm.eps, cos, sin),
                     _norm_rope_triton(k, self.k_norm.weight, self.k_norm.eps, cos, sin))
        if fused is not None and fused[0] is not None and fused[1] is not None:
            q, k = fused
        else:
            if cfg.qk_norm:
                q, k = self.q_norm(q), self.k_norm(k)
            q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        write_kv(k_cache, v_cache, k, v, meta.slot_mapping)
        attn = paged_attention(q, k_cache, v_cache, meta, self.scale, self.window, cfg.attn_logit_softcapping)
        attn = self.o_proj(attn.reshape(tokens, self.q_size))
        if cfg.sandwich_norms:
            attn = self.post_attention_layernorm(attn)
            pre_mlp = self.pre_feedforward_layernorm
        else:
            pre_mlp = self.post_attention_layernorm
        hidden = residual + attn
        gate, up = self.gate_up_proj(pre_mlp(hidden)).chunk(2, dim=-1)
        mlp = self.down_proj(F.gelu(gate, approximate="tanh") * up)
        if cfg.sandwich_norms:
            mlp = self.post_feedforward_layernorm(mlp)
        return hidden + mlp


class GemmaModel(nn.Module):
    def __init__(self, cfg: ModelConfig, max_positions: int) -> None:
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(GemmaLayer(cfg, i) for i in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.rope_global = RotaryTable(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling_factor, max_positions)
        self.rope_local = RotaryTable(cfg.head_dim, cfg.rope_local_theta, 1.0, max_positions)

    def init_non_weights(self) -> None:
        """Recompute what the checkpoint does not hold (RoPE tables), e.g. after `to_empty`."""
        self.rope_global.init_tables()
        self.rope_local.init_tables()

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, kv_caches: list[tuple[torch.Tensor, torch.Tensor]],
                meta: AttentionMetadata, logits_indices: torch.Tensor, image_embeds: torch.Tensor | None = None,
                image_rows: torch.Tensor | None = None) -> torch.Tensor:
        """input_ids, positions: [T] (all sequences' new tokens, flattened). Returns float32 logits
        [len(logits_indices), vocab] for the rows that sample; the other rows skip the final norm and
        the vocabulary projection. `image_embeds` [R, hidden] replace the embeddings of rows
        `image_rows` [R] (Gemma 3's image soft tokens)."""
        weight = self.embed_tokens.weight
        # Embeddings are scaled by sqrt(hidden), the scale rounded to the weights' dtype as in training.
        # A host float (no tensor made per step), equal to the rounded scale.
        scale = torch.tensor(self.cfg.hidden_size ** 0.5, dtype=weight.dtype).item()
        hidden = self.embed_tokens(input_ids) * scale
        if image_embeds is not None:
            # As Gemma3Model: the text embeddings are scaled, the projected image features replace the
            # placeholders' embeddings as they are (the vision projector's output is not scaled).
            hidden = hidden.index_copy(0, image_rows, image_embeds.to(hidden.dtype))
        # Once per step rather than per layer: [T, 1, D] in the activations' dtype.
        cos_g, sin_g = (t[:, None, :].to(hidden.dtype) for t in self.rope_global(positions))
        cos_l, sin_l = (t[:, None, :].to(hidden.dtype) for t in self.rope_local(positions))
        for layer, (k_cache, v_cache) in zip(self.layers, kv_caches):
            cos, sin = (cos_l, sin_l) if layer.sliding else (cos_g, sin_g)
            hidden = layer(hidden, cos, sin, k_cache, v_cache, meta)
        hidden = self.norm(hidden[logits_indices])
        logits = F.linear(hidden, weight).float()  # tied output embedding
        if self.cfg.final_logit_softcapping is not None:
            cap = self.cfg.final_logit_softcapping
            logits = torch.tanh(logits / cap) * cap
        return logits
