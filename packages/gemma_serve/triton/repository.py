"""Renders a Triton model repository from the templates in `data/triton/` and the serving settings.

Configuration is data: the templates are never hand-edited per deployment; everything that varies
comes from `ServingSettings` (config.yaml's model_metadata).
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import jinja2

from gemma_serve.engine.config import EngineConfig
from gemma_serve.settings import ServingSettings
from gemma_serve.triton import contract

PORTABLE_MODEL = "gemma_portable"

# data/ at the repository root; in a Truss image it sits at the Truss's data_dir.
DEFAULT_DATA_DIR = Path(__file__).resolve().parents[3] / "data"
# The folder that holds the gemma_serve package (packages/ here, /packages in a Truss image).
PACKAGES_DIR = Path(__file__).resolve().parents[2]


def engine_config(settings: ServingSettings) -> EngineConfig:
    """The engine's config. The HF token is not part of it: it reaches the Triton process as the
    `HF_TOKEN` environment variable, so it is never written into the rendered repository."""
    return EngineConfig(
        model=settings.model,
        revision=settings.revision,
        device=settings.device,
        dtype=settings.dtype,
        block_size=settings.block_size,
        num_kv_blocks=settings.num_kv_blocks,
        kv_cache_memory_fraction=settings.kv_cache_memory_fraction,
        cpu_kv_cache_tokens=settings.cpu_kv_cache_tokens,
        max_num_seqs=settings.max_num_seqs,
        max_num_batched_tokens=settings.max_num_batched_tokens,
        max_model_len=settings.max_model_len,
        max_queue_len=settings.max_queue_len,
        enable_prefix_caching=settings.enable_prefix_caching,
        quantization=settings.quantization,
        quantize_lm_head=settings.quantize_lm_head,
        load_format=settings.load_format,
        cuda_graphs=settings.cuda_graphs,
        prefill_cuda_graphs=settings.prefill_cuda_graphs,
        overlap_steps=settings.overlap_steps,
        sliding_window_kv=settings.sliding_window_kv,
        float32_residual=settings.float32_residual,
    )


def _environment(template_dir: Path) -> jinja2.Environment:
    return jinja2.Environment(loader=jinja2.FileSystemLoader(str(template_dir)),
                              undefined=jinja2.StrictUndefined, keep_trailing_newline=True)


def render_portable_config(settings: ServingSettings, data_dir: Path = DEFAULT_DATA_DIR) -> str:
    """config.pbtxt of the portable engine model."""
    config = dataclasses.asdict(engine_config(settings))
    config.pop("hf_token")
    template = _environment(data_dir / "triton" / PORTABLE_MODEL).get_template("config.pbtxt.j2")
    return template.render(
        model_name=PORTABLE_MODEL,
        max_batch_size=settings.max_num_seqs,
        inputs=contract.INPUTS + contract.IMAGE_INPUTS,
        outputs=contract.OUTPUTS,
        # A JSON string inside a protobuf text string: JSON's escaping is valid protobuf escaping.
        engine_config_json=json.dumps(json.dumps(config)),
        python_path=str(PACKAGES_DIR),
    )


def render_portable_repository(settings: ServingSettings, out_dir: Path, data_dir: Path = DEFAULT_DATA_DIR) -> Path:
    """Write `<out_dir>/gemma_portable/{config.pbtxt,1/model.py}`; returns the repository root."""
    src = data_dir / "triton" / PORTABLE_MODEL
    if not src.is_dir():
        raise FileNotFoundError(f"model repository template not found: {src}")
    model_dir = Path(out_dir) / PORTABLE_MODEL
    if model_dir.exists():
        shutil.rmtree(model_dir)
    (model_dir / "1").mkdir(parents=True)
    shutil.copy2(src / "model.py", model_dir / "1" / "model.py")
    (model_dir / "config.pbtxt").write_text(render_portable_config(settings, data_dir))
    return Path(out_dir)
