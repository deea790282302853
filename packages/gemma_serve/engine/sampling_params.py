from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class SamplingParams:
    """How one request samples and when it stops. Mirrors the Triton contract's per-request tensors.

    `temperature == 0` means greedy. `top_k == 0` and `top_p == 1.0` disable those filters.
    Penalties follow the usual definitions: repetition divides positive logits (multiplies negative
    ones) of tokens seen in prompt or output; presence subtracts a constant and frequency subtracts
    count x value for tokens seen in the output.
    """

    max_tokens: int = 16
    min_tokens: int = 0
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    # A generated token in this set ends the request (EOS, end-of-turn, caller's single-token stops).
    stop_token_ids: tuple[int, ...] = ()
    # Multi-token stop sequences (TensorRT-LLM's `stop_words_list`): the request ends once its output
    # ends with one of them. The stop tokens are part of the output, as in TensorRT-LLM.
    stop_token_sequences: tuple[tuple[int, ...], ...] = ()
    # Sequences that must never be produced (`bad_words_list`): the last token of each is banned
    # whenever the output ends with the rest of it.
    bad_token_sequences: tuple[tuple[int, ...], ...] = ()
    # Return the log-probability of each sampled token.
    logprobs: bool = False
    extra: dict = field(default_factory=dict, compare=False)

    def __post_init__(self) -> None:
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {self.max_tokens}")
        if self.min_tokens < 0 or self.min_tokens > self.max_tokens:
            raise ValueError(f"min_tokens must be in [0, max_tokens], got {self.min_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.repetition_penalty <= 0:
            raise ValueError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0 or self.top_k == 1
