"""The production engine: a TensorRT-LLM engine built by `build_engine.sh`, served by tritonserver's
TensorRT-LLM backend.

`prepare()` fetches the engine (a Hugging Face repo id or a folder) and checks it against this machine
before anything large is downloaded or started: the engine's `engine_build.json` names the
TensorRT-LLM version and the GPU it was built for, and a TensorRT engine runs only with that version
on that GPU architecture. `start_server()` renders the `tensorrt_llm` model and starts tritonserver.
Every failure says what to rebuild or change.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Literal

from gemma_serve.settings import ServingSettings
from gemma_serve.triton import trtllm_repository
from gemma_serve.triton.repository import DEFAULT_DATA_DIR
from gemma_serve.triton.server import TritonServer, TritonServerError
from gemma_serve.triton.trtllm_repository import EngineModelParams, render_tensorrt_llm_repository

logger = logging.getLogger(__name__)

# The TensorRT-LLM release this project's build script, model template and tensor contract are written
# for, and the NGC image that ships it (Triton 25.05). Keep in step with build_engine.sh and config.yaml.
PINNED_TRTLLM_VERSION = "0.19.0"
NGC_IMAGE = "nvcr.io/nvidia/tritonserver:25.05-trtllm-python-py3"
ENGINE_BUILD_FILE = "engine_build.json"
# trtllm-build's own description of the engine; the fallback for engines not built by build_engine.sh.
ENGINE_CONFIG_FILE = "config.json"
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model")


class EngineError(RuntimeError):
    """The TensorRT-LLM engine cannot be served here; the message says what to rebuild or change."""


@dataclass(frozen=True)
class GpuInfo:
    name: str
    compute_capability: str  # "9.0"


@dataclass(frozen=True)
class EngineBuild:
    """engine_build.json: what build_engine.sh built, for which software and hardware."""

    tensorrt_llm_version: str
    gpu_name: str | None
    compute_capability: str | None
    quantization: str
    max_batch_size: int
    max_input_len: int
    max_seq_len: int
    tp_size: int
    source_checkpoint: str
    paged_context_fmha: bool = True
    # Per-layer attention windows (Gemma 2/3 sliding-window layers); empty: all layers global.
    attention_window: tuple[int, ...] = ()

    @classmethod
    def from_engine_dir(cls, engine_dir: Path, name: str | None = None) -> EngineBuild:
        build_file, config_file = engine_dir / ENGINE_BUILD_FILE, engine_dir / ENGINE_CONFIG_FILE
        if build_file.is_file():
            return cls.from_json(_read_json(build_file), build_file)
        if config_file.is_file():
            logger.warning("%s has no %s (not built by build_engine.sh): the GPU it was built for cannot be "
                           "checked; using trtllm-build's config.json", engine_dir, ENGINE_BUILD_FILE)
            return cls.from_trtllm_config(_read_json(config_file), config_file)
        raise EngineError(
            f"{name or engine_dir} is not a TensorRT-LLM engine: it has neither {ENGINE_BUILD_FILE} nor "
            f"{ENGINE_CONFIG_FILE}. Build an engine with ./build_engine.sh (docs/production.md) and point "
            f"engine_repository at its folder or at the Hugging Face repo it was uploaded to.")

    @classmethod
    def from_json(cls, data: dict, source: Path | str = ENGINE_BUILD_FILE) -> EngineBuild:
        try:
            gpu = data.get("gpu") or {}
            limits = data["limits"]
            return cls(
                tensorrt_llm_version=str(data["tensorrt_llm_version"]),
                gpu_name=gpu.get("name"),
                compute_capability=None if gpu.get("compute_capability") is None else str(gpu["compute_capability"]),
                quantization=str(data["quantization"]),
                max_batch_size=int(limits["max_batch_size"]),
                max_input_len=int(limits["max_input_len"]),
                max_seq_len=int(limits["max_seq_len"]),
                tp_size=int(data["tp_size"]),
                source_checkpoint=str(data["source_checkpoint"]),
                paged_context_fmha=bool(data.get("paged_context_fmha", True)),
                attention_window=tuple(int(w) for w in data.get("attention_window") or ()),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise EngineError(f"{source} is malformed ({type(exc).__name__}: {exc}); rebuild the engine with "
                              f"./build_engine.sh, which writes it") from exc

    @classmethod
    def from_trtllm_config(cls, data: dict, source: Path | str = ENGINE_CONFIG_FILE) -> EngineBuild:
        try:
            pretrained, build = data["pretrained_config"], data["build_config"]
            quant = (pretrained.get("quantization") or {}).get("quant_algo") or "none"
            return cls(
                tensorrt_llm_version=str(data["version"]),
                gpu_name=None,
                compute_capability=None,
                quantization=str(quant).lower(),
                max_batch_size=int(build["max_batch_size"]),
                max_input_len=int(build["max_input_len"]),
                max_seq_len=int(build["max_seq_len"]),
                tp_size=int((pretrained.get("mapping") or {}).get("tp_size", 1)),
                source_checkpoint=str(pretrained.get("architecture", "unknown")),
                paged_context_fmha=bool((build.get("plugin_config") or {}).get("use_paged_context_fmha", False)),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise EngineError(f"{source} is not a trtllm-build engine config ({type(exc).__name__}: {exc})") from exc


@dataclass(frozen=True)
class PreparedEngine:
    engine_dir: Path
    build: EngineBuild
    tokenizer_source: str
    tokenizer_revision: str | None
    # The context window requests are checked against: the engine's max_seq_len, or less if configured.
    max_model_len: int
    model_params: EngineModelParams


def resolve_engine(settings: ServingSettings, backend_dir: Path | None = None
                   ) -> Literal["portable", "tensorrt_llm"]:
    """`engine: auto` is tensorrt_llm where tritonserver has the backend and an engine is configured."""
    if settings.engine != "auto":
        return settings.engine
    backend_dir = backend_dir or trtllm_repository.TRTLLM_BACKEND_DIR
    if backend_dir.is_dir() and settings.engine_repository:
        logger.info("engine auto -> tensorrt_llm (%s, engine %s)", backend_dir, settings.engine_repository)
        return "tensorrt_llm"
    why = "no engine_repository configured" if backend_dir.is_dir() else f"no TensorRT-LLM backend at {backend_dir}"
    logger.info("engine auto -> portable (%s)", why)
    return "portable"


def detect_gpus() -> list[GpuInfo]:
    """This machine's GPUs as nvidia-smi reports them; empty without a driver or GPU."""
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return []
    try:
        out = subprocess.run([exe, "--query-gpu=name,compute_cap", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=60, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        logger.warning("nvidia-smi failed: %s", exc)
        return []
    if out.returncode != 0:
        logger.warning("nvidia-smi failed (%d): %s", out.returncode, (out.stderr or out.stdout).strip())
        return []
    gpus = []
    for line in out.stdout.splitlines():
        name, _, cap = line.rpartition(",")
        if name.strip():
            gpus.append(GpuInfo(name.strip(), cap.strip()))
    return gpus


def installed_trtllm_version() -> str | None:
    """The TensorRT-LLM release of this image (the NGC image installs the `tensorrt_llm` wheel);
    read from the package metadata, because importing tensorrt_llm initialises CUDA."""
    for dist in ("tensorrt_llm", "tensorrt-llm"):
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
    return None


def _release(version: str) -> str:
    """'0.19.0.post1' -> '0.19.0'; engines are tied to the release, not to a post-release rebuild."""
    match = re.match(r"\d+\.\d+\.\d+", version.strip())
    return match.group(0) if match else version.strip()


def check_compatibility(build: EngineBuild, gpus: list[GpuInfo], trtllm_version: str | None,
                        engine_dir: Path | str = "the engine") -> None:
    """Raise EngineError if the engine cannot run here; log what cannot be checked."""
    rebuild = (f"Rebuild it with ./build_engine.sh --model {build.source_checkpoint} inside {NGC_IMAGE} on the "
               f"GPU type this deployment runs on (docs/production.md).")
    if _release(build.tensorrt_llm_version) != PINNED_TRTLLM_VERSION:
        raise EngineError(
            f"{engine_dir} was built with TensorRT-LLM {build.tensorrt_llm_version}, but this deployment is written "
            f"for TensorRT-LLM {PINNED_TRTLLM_VERSION} (its config.pbtxt template and tensor names). {rebuild}")
    if trtllm_version is None:
        logger.warning("cannot tell which TensorRT-LLM this image has (no tensorrt_llm package metadata); "
                       "assuming %s as in %s", PINNED_TRTLLM_VERSION, NGC_IMAGE)
    elif _release(trtllm_version) != _release(build.tensorrt_llm_version):
        raise EngineError(
            f"{engine_dir} was built with TensorRT-LLM {build.tensorrt_llm_version}, but this image has "
            f"{trtllm_version}; engines do not load across TensorRT-LLM versions. Use base_image {NGC_IMAGE} "
            f"in config.yaml. {rebuild}")
    if not gpus:
        raise EngineError(
            f"no NVIDIA GPU is visible (nvidia-smi found none), and the TensorRT-LLM engine {engine_dir} needs "
            f"{build.tp_size} GPU(s) of type {build.gpu_name or 'the one it was built on'}. Run on a GPU machine "
            f"(config.yaml resources.accelerator), or set engine: portable.")
    if len(gpus) < build.tp_size:
        raise EngineError(
            f"{engine_dir} is built for tensor parallelism {build.tp_size} (one GPU per rank) but this machine "
            f"has {len(gpus)} GPU(s). Set resources.accelerator to {build.gpu_name or 'its GPU'}:{build.tp_size} "
            f"in config.yaml, or rebuild with --tp-size {len(gpus)}.")
    here = gpus[0]
    if build.compute_capability is None:
        logger.warning("%s does not record the GPU it was built for; if tritonserver fails to deserialize it, "
                       "rebuild it on a %s", engine_dir, here.name)
    elif build.compute_capability != here.compute_capability:
        raise EngineError(
            f"{engine_dir} was built on {build.gpu_name} (compute capability {build.compute_capability}), but "
            f"this machine has {here.name} (compute capability {here.compute_capability}). TensorRT engines "
            f"run only on the GPU architecture they were built for: rebuild it on a {here.name} with "
            f"./build_engine.sh --model {build.source_checkpoint}, or deploy on a {build.gpu_name} "
            f"(config.yaml resources.accelerator).")
    elif build.gpu_name and build.gpu_name != here.name:
        logger.warning("%s was built on %s and runs on %s (same compute capability %s): it will load, but "
                       "its kernels were tuned for the other GPU; rebuild on %s for best speed",
                       engine_dir, build.gpu_name, here.name, here.compute_capability, here.name)


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise EngineError(f"cannot read {path}: {exc}") from exc
    if not isinstance(data, dict):
        raise EngineError(f"{path} is not a JSON object")
    return data


def _is_local(name: str) -> bool:
    return name.startswith(("/", ".", "~")) or Path(name).expanduser().exists()


def _download(repo_id: str, revision: str | None, token: str | None, patterns: list[str] | None) -> Path:
    """A Hugging Face snapshot (cached in HF_HOME; tqdm shows progress), errors turned into advice."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    try:
        return Path(snapshot_download(repo_id, revision=revision, token=token, allow_patterns=patterns))
    except GatedRepoError as exc:
        raise EngineError(f"{repo_id} is gated: accept its terms on huggingface.co with the account whose token "
                          f"is the hf_access_token secret") from exc
    except RepositoryNotFoundError as exc:
        raise EngineError(
            f"engine_repository '{repo_id}' was not found on the Hugging Face Hub, or the hf_access_token secret "
            f"cannot read it. Build and upload one with ./build_engine.sh --model <checkpoint> --output <dir> "
            f"--upload-repo {repo_id}, or set engine_repository to a local engine folder.") from exc
    except RevisionNotFoundError as exc:
        raise EngineError(f"revision '{revision}' of {repo_id} does not exist (engine_revision)") from exc
    except (LocalEntryNotFoundError, HfHubHTTPError, OSError) as exc:
        raise EngineError(f"cannot download {repo_id} from the Hugging Face Hub: {exc}") from exc


def fetch_engine_metadata(settings: ServingSettings, hf_token: str | None) -> Path:
    """The engine folder with at least its small description files: a local folder as is, a repo id
    with only engine_build.json and config.json downloaded (the check runs before gigabytes move)."""
    name = settings.engine_repository
    if not name:
        raise EngineError(
            "engine: tensorrt_llm needs engine_repository in config.yaml's model_metadata (a Hugging Face repo "
            "id or a folder with an engine from ./build_engine.sh); or set engine: auto / portable.")
    if _is_local(name):
        path = Path(name).expanduser()
        if not path.is_dir():
            raise EngineError(f"engine_repository folder {path} does not exist. Build an engine into it with "
                              f"./build_engine.sh --model <checkpoint> --output {path}.")
        return path
    logger.info("fetching the description of engine %s", name)
    return _download(name, settings.engine_revision, hf_token, [ENGINE_BUILD_FILE, ENGINE_CONFIG_FILE])


def fetch_engine(settings: ServingSettings, hf_token: str | None, build: EngineBuild) -> Path:
    name = settings.engine_repository
    assert name
    if _is_local(name):
        path = Path(name).expanduser()
    else:
        logger.info("downloading engine %s (cached after the first start)", name)
        path = _download(name, settings.engine_revision, hf_token, None)
    missing = [f"rank{r}.engine" for r in range(build.tp_size) if not (path / f"rank{r}.engine").is_file()]
    if missing:
        raise EngineError(f"engine {name} is incomplete: {', '.join(missing)} missing in {path}. Rebuild or "
                          f"re-upload it with ./build_engine.sh.")
    return path


def _tokenizer_source(settings: ServingSettings, engine_dir: Path) -> tuple[str, str | None]:
    if settings.tokenizer:  # also set by tokenizer_repository
        return settings.tokenizer, None
    if any((engine_dir / f).is_file() for f in _TOKENIZER_FILES):
        return str(engine_dir), None
    return settings.model, settings.revision


def _model_params(settings: ServingSettings, engine_dir: Path, build: EngineBuild) -> EngineModelParams:
    window = tuple(min(w, build.max_seq_len) for w in build.attention_window)
    sliding = any(w < build.max_seq_len for w in window)
    reuse = settings.enable_kv_cache_reuse
    if reuse and not build.paged_context_fmha:
        logger.warning("enable_kv_cache_reuse is off: %s was built without paged context FMHA "
                       "(build_engine.sh enables it)", engine_dir)
        reuse = False
    if reuse and sliding:
        # Sliding-window layers keep a cyclic KV cache, whose blocks cannot be shared between requests.
        logger.warning("enable_kv_cache_reuse is off: the engine has sliding-window layers shorter than "
                       "max_seq_len (%d)", build.max_seq_len)
        reuse = False
    return EngineModelParams(engine_dir=engine_dir, max_batch_size=build.max_batch_size,
                             enable_kv_cache_reuse=reuse, attention_window=window if sliding else ())


def prepare(settings: ServingSettings, hf_token: str | None = None, gpus: list[GpuInfo] | None = None,
            trtllm_version: str | None = None) -> PreparedEngine:
    """Fetch and check the engine. `gpus` and `trtllm_version` default to this machine's."""
    described = fetch_engine_metadata(settings, hf_token)
    build = EngineBuild.from_engine_dir(described, settings.engine_repository)
    check_compatibility(build, detect_gpus() if gpus is None else gpus,
                        installed_trtllm_version() if trtllm_version is None else trtllm_version,
                        settings.engine_repository or described)
    engine_dir = fetch_engine(settings, hf_token, build)
    source, revision = _tokenizer_source(settings, engine_dir)
    max_model_len = min(build.max_seq_len, settings.max_model_len or build.max_seq_len)
    logger.info("engine %s: TensorRT-LLM %s, %s, batch %d, input %d, sequence %d, tp %d, built on %s",
                settings.engine_repository, build.tensorrt_llm_version, build.quantization, build.max_batch_size,
                build.max_input_len, build.max_seq_len, build.tp_size, build.gpu_name or "an unrecorded GPU")
    return PreparedEngine(engine_dir=engine_dir, build=build, tokenizer_source=source, tokenizer_revision=revision,
                          max_model_len=max_model_len, model_params=_model_params(settings, engine_dir, build))


def start_server(settings: ServingSettings, engine: PreparedEngine, data_dir: Path | None = None,
                 backend_dir: Path | None = None) -> TritonServer:
    """Render the `tensorrt_llm` model and start tritonserver; fail fast with its log and advice."""
    backend_dir = backend_dir or trtllm_repository.TRTLLM_BACKEND_DIR
    if not backend_dir.is_dir():
        raise EngineError(
            f"this tritonserver has no TensorRT-LLM backend ({backend_dir} is missing). Serve TensorRT-LLM "
            f"engines from base_image {NGC_IMAGE} (config.yaml), or set engine: auto / portable.")
    workdir = Path(settings.workdir) if settings.workdir else Path(tempfile.mkdtemp(prefix="gemma-serve-"))
    repository = render_tensorrt_llm_repository(settings, engine.model_params, workdir / "model_repository",
                                                data_dir=Path(data_dir) if data_dir else DEFAULT_DATA_DIR)
    # Tensor parallelism: the backend spawns one executor worker per GPU over MPI (orchestrator mode),
    # so one tritonserver process serves the engine without mpirun.
    env = {"TRTLLM_ORCHESTRATOR": "1"} if engine.build.tp_size > 1 else {}
    server = TritonServer(
        repository, workdir,
        grpc_port=settings.triton_grpc_port, http_port=settings.triton_http_port,
        metrics_port=settings.triton_metrics_port, startup_timeout_s=settings.triton_startup_timeout_s,
        log_verbose=settings.triton_log_verbose, extra_env=env,
    )
    try:
        server.start()
    except TritonServerError as exc:
        raise EngineError(
            f"tritonserver did not load the TensorRT-LLM engine {engine.engine_dir} (log: {server.log_path}). "
            f"Usual causes: the engine was built with another TensorRT-LLM or on another GPU type (rebuild it with "
            f"./build_engine.sh inside {NGC_IMAGE}); not enough GPU memory (lower kv_cache_free_gpu_mem_fraction "
            f"or rebuild with a smaller --max-batch-size); a slow first load (raise triton_startup_timeout_s).\n"
            f"{exc}") from exc
    return server

