"""Sampling for a whole batch of rows, on the logits' device.

Order: penalties -> bans (bad words, stop tokens before min_tokens) -> log-probs -> greedy or
temperature / top-k / top-p -> draw. A seeded request draws from its own generator, so its output
does not depend on which other requests share the batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from gemma_serve.engine.sequence import Sequence


@dataclass
class SampleResult:
    token_ids: list[int]
    logprobs: list[float] | None  # log-probability of each sampled token, when any row asked


def _padded(rows: list[list[int]], pad: int, device: torch.device) -> torch.Tensor:
    width = max(1, max(len(r) for r in rows))
    return torch.tensor([r + [pad] * (width - len(r)) for r in rows], dtype=torch.long, device=device)


def _penalize(logits: torch.Tensor, seqs: list[Sequence]) -> None:
    """Repetition (tokens of prompt and output), presence and frequency (output counts) penalties,
    for all penalised rows at once. Rows without penalties are untouched."""
    rows = [i for i, s in enumerate(seqs) if s.params.repetition_penalty != 1.0
            or s.params.presence_penalty != 0.0 or s.params.frequency_penalty != 0.0]
    if not rows:
        return
    device, vocab = logits.device, logits.shape[-1]
    idx = torch.tensor(rows, dtype=torch.long, device=device)
    sub = logits[idx]
    # Token counts with one spare column, where the padding lands.
    outputs = _padded([seqs[i].output_token_ids for i in rows], vocab, device)
    counts = torch.zeros(len(rows), vocab + 1, dtype=sub.dtype, device=device)
    counts.scatter_add_(1, outputs, torch.ones_like(outputs, dtype=sub.dtype))
    counts = counts[:, :vocab]
    prompts = _padded([seqs[i].token_ids[:seqs[i].num_prompt_tokens] for i in rows], vocab, device)
    seen = torch.zeros(len(rows), vocab + 1, dtype=torch.bool, device=device)
    seen.scatter_(1, prompts, True)
    seen = seen[:, :vocab] | (counts > 0)

    def column(name: str) -> torch.Tensor:
        return torch.tensor([getattr(seqs[i].params, name) for i in rows], dtype=sub.dtype, device=device)[:, None]

    rep = column("repetition_penalty")
    sub = torch.where(seen, torch.where(sub > 0, sub / rep, sub * rep), sub)
    sub = sub - column("frequency_penalty") * counts - column("presence_penalty") * (counts > 0).to(sub.dtype)
    logits[idx] = sub


def _ban(logits: torch.Tensor, seqs: list[Sequence]) -> None:
    for i, seq in enumerate(seqs):
        p = seq.params
        banned: list[int] = []
        if seq.num_output_tokens < p.min_tokens:
            banned.extend(p.stop_token_ids)
            banned.extend(s[-1] for s in p.stop_token_sequences if len(s) == 1)
        out = seq.output_token_ids
        for bad in p.bad_token_sequences:
            prefix = list(bad[:-1])
            if not prefix or out[len(out) - len(prefix):] == prefix:
                banned.append(bad[-1])
        if banned:
            logits[i, torch.tensor(banned, device=logits.device)] = float("-inf")


def _top_k_top_p(logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Mask everything outside each row's top-k and top-p nucleus (k = 0 and p = 1 disable)."""
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    vocab = logits.shape[-1]
    k = torch.where(top_k > 0, top_k, torch.full_like(top_k, vocab)).clamp(max=vocab)
    ranks = torch.arange(vocab, device=logits.device)[None, :]
    mask = ranks >= k[:, None]
    probs = torch.softmax(sorted_logits.masked_fill(mask, float("-inf")), dim=-1)
    # Keep a token while the mass before it is below p (the most likely token always stays).
    mass_before = probs.cumsum(dim=-1) - probs
    mask |= mass_before >= top_p[:, None]
    sorted_logits = sorted_logits.masked_fill(mask, float("-inf"))
    return torch.empty_like(logits).scatter_(-1, order, sorted_logits)


@dataclass
class SampledTokens:
    """A step's draws still on the device: nothing has waited for the GPU yet."""

    token_ids: torch.Tensor  # [rows] int64
    logprobs: torch.Tensor | None  # [rows] float32, when any row asked

    def to_host(self) -> SampleResult:
        return SampleResult(self.token_ids.tolist(), self.logprobs.tolist() if self.logprobs is not None else None)


def needs_history(seq: Sequence) -> bool:
    """Sampling this sequence reads its earlier output tokens' values (penalties, bad words), so its
    previous token must be on the host before its next step is sampled."""
    p = seq.params
    return (p.repetition_penalty != 1.0 or p.presence_penalty != 0.0 or p.frequency_penalty != 0.0
            or bool(p.bad_token_sequences))


def sample(logits: torch.Tensor, seqs: list[Sequence]) -> SampleResult:
    """logits: [rows, vocab] float32, one row per sequence. Modified in place."""
    return sample_on_device(logits, seqs).to_host()


def sample_on_device(logits: torch.Tensor, seqs: list[Sequence]) -> SampledTokens:
    """As `sample`, without waiting for the GPU: the draws stay on the logits' device."""
    _penalize(logits, seqs)
    _ban(logits, seqs)
    device = logits.device
    temperatures = [1.0 if s.params.greedy else s.params.temperature for s in seqs]
    if any(t != 1.0 for t in temperatures):  # a full [rows, vocab] pass, skipped when no row needs it
        logits = logits / torch.tensor(temperatures, device=device)[:, None]
    want_logprobs = any(s.params.logprobs for s in seqs)
    logprobs_all = torch.log_softmax(logits, dim=-1) if want_logprobs else None

    chosen = logits.argmax(dim=-1)
    sampled_rows = [i for i, s in enumerate(seqs) if not s.params.greedy]
    if sampled_rows:
        idx = torch.tensor(sampled_rows, device=device)
        top_k = torch.tensor([seqs[i].params.top_k for i in sampled_rows], device=device)
        top_p = torch.tensor([seqs[i].params.top_p for i in sampled_rows], device=device, dtype=torch.float32)
        probs = torch.softmax(_top_k_top_p(logits[idx], top_k, top_p), dim=-1)
        draws = torch.empty(len(sampled_rows), dtype=torch.long, device=device)
        unseeded = [j for j, i in enumerate(sampled_rows) if seqs[i].generator is None]
        if unseeded:
            u = torch.tensor(unseeded, device=device)
            draws[u] = torch.multinomial(probs[u], 1).squeeze(-1)
        for j, i in enumerate(sampled_rows):
            generator = seqs[i].generator
            if generator is not None:
                draws[j] = torch.multinomial(probs[j], 1, generator=generator)[0]
        chosen[idx] = draws
    logprobs = None
    if logprobs_all is not None:
        logprobs = logprobs_all.gather(1, chosen[:, None]).squeeze(-1)
    return SampledTokens(chosen, logprobs)
