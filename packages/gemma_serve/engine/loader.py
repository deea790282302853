"""Load Gemma weights from a Hugging Face checkpoint (local folder or repo id) into `GemmaModel`.

Handles single-file and sharded safetensors and the tensor-name layouts of every published Gemma:
`model.` (Gemma/Gemma2/Gemma3ForCausalLM), `model.language_model.` (transformers 5's
Gemma3ForConditionalGeneration) and `language_model.model.` (google/gemma-3-*-it as published).
Separate q/k/v and gate/up projections are fused into one matrix each while loading. Gemma 3's
vision tower and projector (`[model.]vision_tower.vision_model.*`, `[model.]multi_modal_projector.*`)
load separately, into `VisionEncoder`, by `load_vision_weights`.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import torch

from gemma_serve.engine.models.gemma import GemmaModel
from gemma_serve.engine.models.vision import VisionEncoder

logger = logging.getLogger(__name__)

_PREFIXES = ("model.language_model.", "language_model.model.", "model.")
# Weights the text decoder does not use (vision tower, projector, a separate lm_head when tied).
_SKIP = re.compile(r"^(model\.)?(vision_tower|multi_modal_projector|vision_model)\.|^(language_model\.)?lm_head\.")
# Vision tensors: `[model.]vision_tower.[vision_model.]*` (published: with vision_model; transformers 5
# saves without) and `[model.]multi_modal_projector.*`. SigLIP's pooling head is not used by Gemma 3.
_VISION = re.compile(r"^(?:model\.)?(?:(vision_tower)\.(?:vision_model\.)?|(multi_modal_projector)\.)(.+)$")
_FUSED = {"q_proj": ("qkv_proj", 0), "k_proj": ("qkv_proj", 1), "v_proj": ("qkv_proj", 2),
          "gate_proj": ("gate_up_proj", 0), "up_proj": ("gate_up_proj", 1)}


def resolve_checkpoint(model: str, token: str | None = None, revision: str | None = None) -> Path:
    """A local folder as is, else a Hugging Face repo id downloaded (config, weights, tokenizer)."""
    path = Path(model).expanduser()
    if path.is_dir():
        if not (path / "config.json").exists():
            raise FileNotFoundError(f"model folder {path} has no config.json (expected a Hugging Face layout)")
        return path
    if path.exists() or model.startswith((".", "/", "~")) or model.count("/") != 1:
        raise FileNotFoundError(f"model folder not found: {model} (and it is not a Hugging Face repo id 'org/name')")
    from huggingface_hub import snapshot_download

    logger.info("downloading %s%s from the Hugging Face hub", model, f"@{revision}" if revision else "")
    try:
        folder = snapshot_download(model, token=token, revision=revision,
                                   allow_patterns=["*.json", "*.safetensors", "tokenizer*", "*.model", "*.jinja"])
    except Exception as exc:  # network, auth (gated Gemma repos need a token), unknown repo or revision
        raise FileNotFoundError(f"could not download {model!r} from the Hugging Face hub "
                                f"({type(exc).__name__}: {exc}); gated models need hf_token") from exc
    return Path(folder)


def safetensors_files(folder: Path) -> list[Path]:
    index = folder / "model.safetensors.index.json"
    if index.exists():
        shards = [folder / s for s in sorted(set(json.loads(index.read_text())["weight_map"].values()))]
        missing = [s.name for s in shards if not s.exists()]
        if missing:
            raise FileNotFoundError(f"{folder} lacks weight shards listed in its index: {missing[:4]}")
        return shards
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors weights in {folder}")
    return files


def _target(name: str) -> str | None:
    """Checkpoint tensor name -> our parameter name (or None to skip)."""
    if _SKIP.match(name):
        return None
    for prefix in _PREFIXES:
        if name.startswith(prefix):
            name = name[len(prefix):]
            break
    else:
        return None
    name = name.replace("self_attn.", "").replace("mlp.", "")
    return name


def load_weights(model: GemmaModel, folder: Path) -> None:
    """Copy every tensor into the model (converted to its dtype and device); fail on missing ones."""
    from safetensors import safe_open

    params = dict(model.named_parameters())
    cfg = model.cfg
    d = cfg.head_dim
    splits = {"qkv_proj": [cfg.num_heads * d, cfg.num_kv_heads * d, cfg.num_kv_heads * d],
              "gate_up_proj": [cfg.intermediate_size, cfg.intermediate_size]}
    loaded: set[str] = set()
    fused_parts: dict[str, set[int]] = {}
    for file in safetensors_files(folder):
        with safe_open(str(file), framework="pt") as f:
            for key in f.keys():
                name = _target(key)
                if name is None:
                    continue
                parts = name.split(".")
                fused = _FUSED.get(parts[-2]) if len(parts) >= 2 else None
                if fused is not None:
                    parts[-2] = fused[0]
                    name = ".".join(parts)
                if name not in params:
                    raise KeyError(f"checkpoint tensor {key!r} has no place in the model ({name!r})")
                tensor = f.get_tensor(key)
                param = params[name]
                with torch.no_grad():
                    if fused is None:
                        if tuple(tensor.shape) != tuple(param.shape):
                            raise ValueError(f"{key}: shape {tuple(tensor.shape)} != expected {tuple(param.shape)}")
                        param.copy_(tensor)
                    else:
                        sizes = splits[fused[0]]
                        start = sum(sizes[: fused[1]])
                        param[start:start + sizes[fused[1]]].copy_(tensor)
                        fused_parts.setdefault(name, set()).add(fused[1])
                loaded.add(name)
    missing = sorted(set(params) - loaded)
    incomplete = sorted(n for n, got in fused_parts.items() if len(got) != len(splits[n.split(".")[-2]]))
    if missing or incomplete:
        raise ValueError(f"checkpoint in {folder} lacks weights: {(missing + incomplete)[:8]}")


def _vision_name(name: str) -> str | None:
    """A vision tensor's name without the optional levels, as both sides of the copy spell it."""
    match = _VISION.match(name)
    return None if match is None else f"{match.group(1) or match.group(2)}.{match.group(3)}"


def load_vision_weights(vision: VisionEncoder, folder: Path) -> None:
    """Copy the vision tower's and projector's tensors into `vision`; fail on missing or misshapen ones."""
    from safetensors import safe_open

    params = {_vision_name(name): p for name, p in vision.named_parameters()}
    loaded: set[str] = set()
    for file in safetensors_files(folder):
        with safe_open(str(file), framework="pt") as f:
            for key in f.keys():
                name = _vision_name(key)
                if name is None or name.startswith("vision_tower.head."):
                    continue
                if name not in params:
                    raise KeyError(f"checkpoint tensor {key!r} has no place in the vision encoder ({name!r})")
                tensor = f.get_tensor(key)
                if tuple(tensor.shape) != tuple(params[name].shape):
                    raise ValueError(f"{key}: shape {tuple(tensor.shape)} != expected {tuple(params[name].shape)}")
                with torch.no_grad():
                    params[name].copy_(tensor)
                loaded.add(name)
    missing = sorted(set(params) - loaded)
    if missing:
        raise ValueError(f"checkpoint in {folder} lacks vision weights (its config.json has a vision_config): "
                         f"{missing[:8]}")
