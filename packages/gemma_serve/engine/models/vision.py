"""Gemma 3's image encoder: the SigLIP vision tower and the multimodal projector.

The tower is transformers' `SiglipVisionModel` built from the checkpoint's `vision_config` (a plain
ViT: the engine gains nothing from owning it). The projector is ours: it average-pools the square
patch grid down to `mm_tokens_per_image` soft tokens (Gemma 3 4B: 64x64 patches -> 16x16 = 256),
normalises them with Gemma's RMSNorm (scale 1 + w) and projects them to the text hidden size. Module
and parameter names follow the checkpoints (`vision_tower.*`, `multi_modal_projector.*`; the tower's
inner `vision_model.` level, present or not depending on the transformers version, is the loader's
business), so the loader copies tensors by name.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from gemma_serve.engine.models.gemma import RMSNorm
from gemma_serve.engine.multimodal import MultimodalConfig
from torch import nn


class MultiModalProjector(nn.Module):
    def __init__(self, mm: MultimodalConfig, vision_hidden: int, text_hidden: int) -> None:
        super().__init__()
        self.patches_per_side = mm.image_size // mm.patch_size
        self.kernel = self.patches_per_side // round(mm.mm_tokens_per_image ** 0.5)
        self.mm_soft_emb_norm = RMSNorm(vision_hidden, mm.vision_eps)
        # Stored [vision_hidden, text_hidden] as published (applied as x @ w, not as an nn.Linear).
        self.mm_input_projection_weight = nn.Parameter(torch.empty(vision_hidden, text_hidden))

    def forward(self, patches: torch.Tensor) -> torch.Tensor:
        """patches: [N, side*side, vision_hidden] in row-major grid order -> [N, tokens, text_hidden]."""
        n, _, dim = patches.shape
        side = self.patches_per_side
        grid = patches.transpose(1, 2).reshape(n, dim, side, side)
        pooled = F.avg_pool2d(grid, kernel_size=self.kernel, stride=self.kernel)
        tokens = pooled.flatten(2).transpose(1, 2)
        return torch.matmul(self.mm_soft_emb_norm(tokens), self.mm_input_projection_weight).to(patches.dtype)


class VisionEncoder(nn.Module):
    """pixel values [N, 3, H, W] -> soft-token embeddings [N, mm_tokens_per_image, text_hidden]."""

    def __init__(self, mm: MultimodalConfig, text_hidden: int) -> None:
        super().__init__()
        from transformers import SiglipVisionConfig, SiglipVisionModel

        # Gemma 3 reads the last hidden state: the pooling head is never used, so it is never built
        # (a checkpoint that has one keeps it unread).
        config = SiglipVisionConfig(**{**mm.vision, "vision_use_head": False})
        config._attn_implementation = "sdpa"  # no mask in the tower: one fused attention per layer
        self.mm = mm
        self.vision_tower = SiglipVisionModel(config)
        self.multi_modal_projector = MultiModalProjector(mm, config.hidden_size, text_hidden)
        self.num_encoded = 0  # images through the tower since start (the feature cache saves the rest)

    @property
    def image_size(self) -> int:
        """Pixels per side of the images `encode` takes."""
        return self.mm.image_size

    def init_non_weights(self) -> None:
        """Recompute what the checkpoint does not hold (the patch position ids), e.g. after `to_empty`."""
        # transformers 4 nests the tower's modules under `vision_model`, transformers 5 does not.
        body = getattr(self.vision_tower, "vision_model", self.vision_tower)
        ids = body.embeddings.position_ids
        with torch.no_grad():
            ids.copy_(torch.arange(ids.shape[-1], device=ids.device).expand_as(ids))

    @torch.no_grad()
    def init_random_weights(self, seed: int = 0) -> None:
        """Benchmark weights with the real shapes: LayerNorms as identity, Gemma RMSNorm scale 1,
        N(0, 0.02) elsewhere, so activations stay finite through the tower."""
        generator = torch.Generator(device=self.multi_modal_projector.mm_input_projection_weight.device)
        generator.manual_seed(seed)
        for name, param in self.named_parameters():
            if isinstance(self.get_submodule(name.rsplit(".", 1)[0]), nn.LayerNorm):
                param.fill_(1.0 if name.endswith("weight") else 0.0)
            elif "norm" in name or name.endswith("bias"):
                param.zero_()
            else:
                param.normal_(0.0, 0.02, generator=generator)

    @torch.inference_mode()
    def encode(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """pixel_values: [N, 3, H, W] (any float dtype/device; moved to the tower's)."""
        weight = self.multi_modal_projector.mm_input_projection_weight
        pixel_values = pixel_values.to(device=weight.device, dtype=weight.dtype)
        patches = self.vision_tower(pixel_values=pixel_values).last_hidden_state
        self.num_encoded += pixel_values.shape[0]
        return self.multi_modal_projector(patches)
