"""Gemma 1, 2 and 3 text decoders, written once.

What differs between generations is data in `ModelConfig`: sandwich norms around attention and MLP
(2, 3), QK-norm (3), attention and final logit soft-capping (2), sliding-window layers with their own
RoPE base (2, 3), linear RoPE scaling of global layers (3). Plain `nn.Linear` layers, and a tied
embedding table used through `lookup` and `project`, so the quantization module can swap them
without the model knowing.

The forward takes a flattened batch: all sequences' new tokens concatenated, with their positions
and the paged-attention metadata, and returns logits only for the rows that will be sampled. The
small operations between the matmuls are the fused ones of `fused_kernels` (one kernel each on CUDA).
"""

from __future__ import annotations

import os

import torch
from gemma_serve.engine.attention import AttentionMetadata, paged_attention
from gemma_serve.engine.fused_kernels import add_rms_norm, apply_rotary, qkv_to_cache, rms_norm
from gemma_serve.engine.model_config import ModelConfig
from gemma_serve.engine.quantization import matmul, output_dtype, projected_gelu_mul
from torch import nn

__all__ = ["GemmaLayer", "GemmaModel", "RMSNorm", "RotaryTable", "TiedEmbedding", "apply_rotary"]

# Steps of up to this many rows get gate_up's output in float32 (see `GemmaModel.set_matmul_out_dtype`).
GATE_UP_FLOAT32_MAX_ROWS = int(os.environ.get("GEMMA_GATE_UP_FLOAT32_MAX_ROWS", "256"))


class RMSNorm(nn.Module):
    """Gemma's RMSNorm: computed in float32, scaled by (1 + weight). One Triton kernel on CUDA."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.zeros(dim))

    def forward(self, x: torch.Tensor, out_dtype: torch.dtype | None = None) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps, out_dtype)


class TiedEmbedding(nn.Embedding):
    """The token embedding table [vocab, hidden], which is also the output projection (Gemma ties
    them). `lookup` and `project` are its two uses; `quantization.QuantizedEmbedding`, which
    `quantize_model` may put in its place, has the same ones."""

    @property
    def dtype(self) -> torch.dtype:
        """The table's dtype, which the model's activations keep."""
        return self.weight.dtype

    def lookup(self, ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        return self(ids).to(dtype)

    def project(self, x: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
        return matmul(x, self.weight, out_dtype)


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

    def forward(self, hidden: torch.Tensor, normed: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                k_cache: torch.Tensor, v_cache: torch.Tensor, meta: AttentionMetadata,
                next_norm: RMSNorm | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """hidden: the residual stream [T, hidden]; normed: input_layernorm(hidden), computed by the
        previous layer's fused tail. Returns the new residual stream and `next_norm` of it."""
        cfg = self.cfg
        tokens = hidden.shape[0]
        if self.sliding:
            meta = meta.for_window()  # this layer's K/V live in the window pool, when there is one
        # The projections return float32 (their unrounded accumulators) when the model asks for it
        # (`GemmaModel.matmul_out_dtype`); the kernels after them round once, to `act`.
        act = normed.dtype
        qkv = self.qkv_proj(normed)
        q = qkv_to_cache(qkv, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim,
                         self.q_norm.weight if cfg.qk_norm else None, self.k_norm.weight if cfg.qk_norm else None,
                         cfg.rms_norm_eps, cos, sin, k_cache, v_cache, meta.slot_mapping)
        attn = paged_attention(q, k_cache, v_cache, meta, self.scale, self.window, cfg.attn_logit_softcapping)
        attn = self.o_proj(attn.reshape(tokens, self.q_size))
        eps = cfg.rms_norm_eps
        if cfg.sandwich_norms:
            hidden, x = add_rms_norm(hidden, attn, self.post_attention_layernorm.weight,
                                     self.pre_feedforward_layernorm.weight, eps, act)
        else:  # Gemma 1: post_attention_layernorm is the pre-MLP norm
            hidden, x = add_rms_norm(hidden, attn, None, self.post_attention_layernorm.weight, eps, act)
        mlp = self.down_proj(projected_gelu_mul(self.gate_up_proj, x))
        post = self.post_feedforward_layernorm.weight if cfg.sandwich_norms else None
        return add_rms_norm(hidden, mlp, post, next_norm.weight if next_norm is not None else None, eps, act)


class GemmaModel(nn.Module):
    def __init__(self, cfg: ModelConfig, max_positions: int) -> None:
        super().__init__()
        self.cfg = cfg
        # A `TiedEmbedding`, or a `quantization.QuantizedEmbedding` after `quantize_model`.
        self.embed_tokens = TiedEmbedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(GemmaLayer(cfg, i) for i in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.rope_global = RotaryTable(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling_factor, max_positions)
        self.rope_local = RotaryTable(cfg.head_dim, cfg.rope_local_theta, 1.0, max_positions)
        # The residual stream's dtype; None: the weights' (ModelRunner sets float32 for 16-bit models
        # unless EngineConfig.float32_residual is off).
        self.residual_dtype: torch.dtype | None = None
        # The matmuls' output dtype, None: their inputs' (see `set_matmul_out_dtype`).
        self.matmul_out_dtype: torch.dtype | None = None

    def set_matmul_out_dtype(self, dtype: torch.dtype | None) -> None:
        """float32: the projections and the LM head of a 16-bit model return their float32
        accumulators unrounded, and the kernels after them round once. In bf16 each of these five
        roundings added about as much error to the logits as any other, and float32 outputs take
        the logits of Gemma 3 4B's shapes from 1.16e-2 to 8.6e-3 from float32 in the CPU emulation
        (bench/bf16_error_attribution.py). gate_up's output, 8x wider than the others, stays 16-bit
        in steps of more than GATE_UP_FLOAT32_MAX_ROWS rows (long prefill chunks): there it cost
        13% of the matmul's time on an H200 (bench/mm_out_dtype_probe.py), and rounding it on the
        prompt's rows alone moves the emulated error by 1e-4. Call after `quantize_model`, which
        makes the layers' projections."""
        self.matmul_out_dtype = dtype
        for layer in self.layers:
            for proj in (layer.qkv_proj, layer.o_proj, layer.gate_up_proj, layer.down_proj):
                proj.out_dtype = dtype
            layer.gate_up_proj.out_dtype_max_rows = GATE_UP_FLOAT32_MAX_ROWS

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """The scaled embeddings of `input_ids` [T] -> [T, hidden], in the residual stream's dtype.
        Embeddings are scaled by sqrt(hidden), the scale rounded to the activations' dtype as in
        training (a host float, no tensor made per step). A float32 residual stream takes the table's
        rows widened and the product unrounded (the first layer's input: in bf16 its rounding moved
        the logits as much as one matmul's)."""
        act_dtype = self.embed_tokens.dtype
        scale = torch.tensor(self.cfg.hidden_size ** 0.5, dtype=act_dtype).item()
        return self.embed_tokens.lookup(input_ids, self.residual_dtype or act_dtype) * scale

    def lm_head(self, hidden: torch.Tensor) -> torch.Tensor:
        """Normed rows [N, hidden] -> float32 logits [N, vocab]: the tied table's projection (its
        float32 accumulators with `matmul_out_dtype`), soft-capped where the model caps."""
        logits = self.embed_tokens.project(hidden, output_dtype(hidden, self.matmul_out_dtype)).float()
        if self.cfg.final_logit_softcapping is not None:
            cap = self.cfg.final_logit_softcapping
            logits = torch.tanh(logits / cap) * cap
        return logits

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
        act_dtype = self.embed_tokens.dtype
        hidden = self.embed(input_ids)
        if image_embeds is not None:
            # As Gemma3Model: the text embeddings are scaled, the projected image features replace the
            # placeholders' embeddings as they are (the vision projector's output is not scaled).
            hidden = hidden.index_copy(0, image_rows, image_embeds.to(hidden.dtype))
        # Once per step rather than per layer: [T, 1, D], float32 with a float32 residual stream (as
        # close to float32 as it gets, at no cost), else in the activations' dtype as Hugging Face.
        rope_dtype = self.residual_dtype or act_dtype
        cos_g, sin_g = (t[:, None, :].to(rope_dtype) for t in self.rope_global(positions))
        cos_l, sin_l = (t[:, None, :].to(rope_dtype) for t in self.rope_local(positions))
        # Each layer ends with the next layer's input norm (fused with its residual add); the last
        # one's output is normed below for the sampled rows only.
        normed = self.layers[0].input_layernorm(hidden, act_dtype)
        last = len(self.layers) - 1
        for i, (layer, (k_cache, v_cache)) in enumerate(zip(self.layers, kv_caches)):
            cos, sin = (cos_l, sin_l) if layer.sliding else (cos_g, sin_g)
            next_norm = self.layers[i + 1].input_layernorm if i < last else None
            hidden, normed = layer(hidden, normed, cos, sin, k_cache, v_cache, meta, next_norm)
        return self.lm_head(self.norm(hidden[logits_indices], act_dtype))
