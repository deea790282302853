"""Attention over the paged KV cache, for a flattened batch that mixes prefill chunks and decodes.

This is the portable reference path in plain PyTorch (any device): each sequence's keys and values
are gathered through its block table into a padded [batch, context] layout and attended with an
explicit mask (causal, sliding window) in float32. A faster kernel can replace `paged_attention`
behind the same `AttentionMetadata`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class AttentionMetadata:
    """Where the step's tokens come from and where their K/V go. T tokens from B sequences."""

    slot_mapping: torch.Tensor  # [T] flat cache slot (block * block_size + offset) for each new token
    query_start: torch.Tensor  # [B + 1] offsets of each sequence's tokens in the flat batch
    context_lens: torch.Tensor  # [B] tokens in the cache after this step (history + new)
    block_tables: torch.Tensor  # [B, max_blocks] block ids, padded with 0
    max_query_len: int
    max_context_len: int
    # [B, max_query_len]: flat index of each padded query position (0 where padding) and its mask.
    query_index: torch.Tensor
    query_valid: torch.Tensor

    @property
    def query_lens(self) -> torch.Tensor:
        return self.query_start[1:] - self.query_start[:-1]


def write_kv(k_cache: torch.Tensor, v_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
             slot_mapping: torch.Tensor) -> None:
    """Store the new tokens' keys and values. Caches are [num_blocks, block_size, kv_heads, head_dim]."""
    kv_heads, head_dim = k_cache.shape[-2:]
    k_cache.view(-1, kv_heads, head_dim).index_copy_(0, slot_mapping, k.to(k_cache.dtype))
    v_cache.view(-1, kv_heads, head_dim).index_copy_(0, slot_mapping, v.to(v_cache.dtype))


def paged_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, meta: AttentionMetadata,
                    scale: float, window: int | None = None, softcap: float | None = None) -> torch.Tensor:
    """q: [T, heads, head_dim] (new tokens, K/V already written). Returns [T, heads, head_dim]."""
    num_blocks, block_size, kv_heads, head_dim = k_cache.shape
    heads = q.shape[1]
    group = heads // kv_heads
    batch = meta.block_tables.shape[0]
    ctx = meta.max_context_len

    # Keys/values of every sequence, padded to the longest context: [B, ctx, kv_heads, D].
    offsets = torch.arange(ctx, device=q.device)
    slots = meta.block_tables.gather(1, (offsets // block_size).expand(batch, -1)) * block_size + offsets % block_size
    keys = k_cache.view(-1, kv_heads, head_dim)[slots]
    values = v_cache.view(-1, kv_heads, head_dim)[slots]

    # Queries padded per sequence: [B, Lq, heads, D].
    queries = q[meta.query_index]
    q_lens = meta.query_lens
    # Absolute position of each query: the new tokens are the last q_len of the context.
    q_pos = (meta.context_lens - q_lens)[:, None] + torch.arange(meta.max_query_len, device=q.device)[None, :]
    k_pos = offsets[None, None, :]
    allowed = (k_pos <= q_pos[:, :, None]) & (k_pos < meta.context_lens[:, None, None])
    if window is not None:
        allowed &= (q_pos[:, :, None] - k_pos) < window

    # [B, kv_heads, group, Lq, D] x [B, kv_heads, ctx, D] -> [B, kv_heads, group, Lq, ctx]
    qh = queries.float().view(batch, meta.max_query_len, kv_heads, group, head_dim).permute(0, 2, 3, 1, 4)
    kh = keys.float().permute(0, 2, 1, 3)
    vh = values.float().permute(0, 2, 1, 3)
    scores = torch.matmul(qh, kh.unsqueeze(2).transpose(-1, -2)) * scale
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    scores = scores.masked_fill(~allowed[:, None, None, :, :], float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    # Padded query rows have no allowed key: their NaNs are dropped when scattering back.
    out = torch.matmul(probs, vh.unsqueeze(2))  # [B, kv_heads, group, Lq, D]
    out = out.permute(0, 3, 1, 2, 4).reshape(batch, meta.max_query_len, heads, head_dim)
    flat = torch.empty_like(q)
    valid = meta.query_valid
    flat[meta.query_index[valid]] = out[valid].to(q.dtype)
    return flat
