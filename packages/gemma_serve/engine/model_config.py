"""Gemma 1, 2 and 3 text-decoder hyper-parameters, read from a Hugging Face `config.json`.

Published configs omit fields that equal transformers' defaults, so the defaults of each
generation are filled in here (checked against transformers' config classes in the tests).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

SUPPORTED = ("gemma", "gemma2", "gemma3_text", "gemma3")

# transformers' defaults per generation, for keys that published configs may leave out.
_DEFAULTS: dict[str, dict[str, Any]] = {
    "gemma": dict(vocab_size=256000, hidden_size=3072, intermediate_size=24576, num_hidden_layers=28,
                  num_attention_heads=16, num_key_value_heads=16, head_dim=256, rms_norm_eps=1e-6,
                  rope_theta=10000.0, max_position_embeddings=8192),
    "gemma2": dict(vocab_size=256000, hidden_size=2304, intermediate_size=9216, num_hidden_layers=26,
                   num_attention_heads=8, num_key_value_heads=4, head_dim=256, rms_norm_eps=1e-6,
                   rope_theta=10000.0, max_position_embeddings=8192, query_pre_attn_scalar=256,
                   sliding_window=4096, attn_logit_softcapping=50.0, final_logit_softcapping=30.0),
    "gemma3_text": dict(vocab_size=262208, hidden_size=2304, intermediate_size=9216, num_hidden_layers=26,
                        num_attention_heads=8, num_key_value_heads=4, head_dim=256, rms_norm_eps=1e-6,
                        rope_theta=1_000_000.0, rope_local_base_freq=10_000.0, max_position_embeddings=131072,
                        query_pre_attn_scalar=256, sliding_window=4096, sliding_window_pattern=6,
                        attn_logit_softcapping=None, final_logit_softcapping=None),
}


@dataclass(frozen=True)
class ModelConfig:
    model_type: str  # gemma | gemma2 | gemma3_text (a multimodal gemma3 config is read as its text part)
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    max_position_embeddings: int
    # Per layer: True for a sliding-window (local) layer.
    sliding: tuple[bool, ...]
    sliding_window: int | None
    rope_theta: float  # global (full-attention) layers
    rope_local_theta: float  # sliding layers
    rope_scaling_factor: float  # linear position scaling of global layers (Gemma 3 4B: 8)
    query_pre_attn_scalar: float
    attn_logit_softcapping: float | None
    final_logit_softcapping: float | None
    eos_token_ids: tuple[int, ...]
    is_multimodal: bool = False
    # The checkpoint's dtype name ("bfloat16" for every published Gemma); dtype "auto" uses it on CUDA.
    torch_dtype: str | None = None

    @property
    def generation(self) -> int:
        return {"gemma": 1, "gemma2": 2, "gemma3_text": 3}[self.model_type]

    @property
    def sandwich_norms(self) -> bool:
        """Gemma 2/3 normalise the outputs of attention and MLP too (pre/post feed-forward norms)."""
        return self.generation >= 2

    @property
    def qk_norm(self) -> bool:
        return self.generation == 3

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> ModelConfig:
        model_type = raw.get("model_type")
        if model_type not in SUPPORTED:
            raise ValueError(f"unsupported model_type {model_type!r}; this engine serves {', '.join(SUPPORTED)}")
        multimodal = model_type == "gemma3"
        text = dict(raw.get("text_config") or {}) if multimodal else dict(raw)
        kind = "gemma3_text" if multimodal else model_type
        cfg = {**_DEFAULTS[kind], **{k: v for k, v in text.items() if v is not None or k.endswith("softcapping")}}
        layers = int(cfg["num_hidden_layers"])
        sliding = _layer_kinds(kind, cfg, layers)
        rope_global, rope_local, factor = _rope(cfg)
        if text.get("use_bidirectional_attention"):
            raise ValueError("bidirectional Gemma (embedding models) is not a decoder this engine serves")
        # The multimodal checkpoints list end-of-turn beside EOS at the top level: [1, 106].
        eos = raw.get("eos_token_id")
        if eos is None:
            eos = text.get("eos_token_id", 1)
        eos_ids = tuple(int(e) for e in eos) if isinstance(eos, (list, tuple)) else (int(eos),)
        head_dim = int(cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"])
        return cls(
            model_type=kind,
            vocab_size=int(cfg["vocab_size"]),
            hidden_size=int(cfg["hidden_size"]),
            intermediate_size=int(cfg["intermediate_size"]),
            num_layers=layers,
            num_heads=int(cfg["num_attention_heads"]),
            num_kv_heads=int(cfg["num_key_value_heads"]),
            head_dim=head_dim,
            rms_norm_eps=float(cfg["rms_norm_eps"]),
            max_position_embeddings=int(cfg["max_position_embeddings"]),
            sliding=sliding,
            sliding_window=int(cfg["sliding_window"]) if any(sliding) else None,
            rope_theta=rope_global,
            rope_local_theta=rope_local,
            rope_scaling_factor=factor,
            query_pre_attn_scalar=float(cfg.get("query_pre_attn_scalar") or head_dim),
            attn_logit_softcapping=cfg.get("attn_logit_softcapping"),
            final_logit_softcapping=cfg.get("final_logit_softcapping"),
            eos_token_ids=eos_ids,
            is_multimodal=multimodal,
            torch_dtype=raw.get("torch_dtype") or raw.get("dtype") or text.get("torch_dtype") or text.get("dtype"),
        )

    @classmethod
    def from_folder(cls, folder: Path) -> ModelConfig:
        path = Path(folder) / "config.json"
        if not path.exists():
            raise FileNotFoundError(f"no config.json in {folder}")
        return cls.from_dict(json.loads(path.read_text()))


def _rope(cfg: dict[str, Any]) -> tuple[float, float, float]:
    """(global theta, local theta, linear scaling factor of global layers), from either layout:
    published configs' `rope_theta` / `rope_local_base_freq` / `rope_scaling`, or transformers 5's
    `rope_parameters` (one dict, or one per layer type)."""
    params = cfg.get("rope_parameters")
    if params:
        full = params.get("full_attention", params)
        local = params.get("sliding_attention", full)
        factor = float(full.get("factor", 1.0)) if full.get("rope_type") == "linear" else 1.0
        return float(full["rope_theta"]), float(local["rope_theta"]), factor
    scaling = cfg.get("rope_scaling") or {}
    factor = float(scaling.get("factor", 1.0)) if scaling.get("rope_type", scaling.get("type")) == "linear" else 1.0
    theta = float(cfg["rope_theta"])
    return theta, float(cfg.get("rope_local_base_freq", theta)), factor


def _layer_kinds(kind: str, cfg: dict[str, Any], layers: int) -> tuple[bool, ...]:
    if cfg.get("layer_types"):
        types = cfg["layer_types"]
        if len(types) != layers:
            raise ValueError(f"layer_types has {len(types)} entries for {layers} layers")
        return tuple(t == "sliding_attention" for t in types)
    if kind == "gemma":
        return (False,) * layers
    if kind == "gemma2":
        return tuple(bool((i + 1) % 2) for i in range(layers))
    pattern = int(cfg.get("sliding_window_pattern") or 6)
    return tuple(bool((i + 1) % pattern) for i in range(layers))
