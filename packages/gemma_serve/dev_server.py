"""Run the Truss locally with truss's own server code, no Docker.

`truss image build-context` writes what the Docker image would contain; this lays it out as the
image does (`/app/main.py`, `/app/model`, `/app/data`, `/app/config.yaml`, `/packages`), installs the
server's requirements into this interpreter, and runs `main.py`. The Truss's `load()` then starts
tritonserver, so one process tree serves: Truss server -> gRPC -> tritonserver -> engine.

On a machine without the `truss` package or a package index (a lent GPU machine), two variables stand in:
`GEMMA_SERVE_TRUSS_SERVER=DIR` names a saved truss server (`python -m gemma_serve.dev_server export-server
DIR`, run where truss is installed: truss's `server/` code and its normalized `config.yaml`), from which
the context is assembled with this checkout's model/, data/, packages/ and config.yaml; and
`GEMMA_SERVE_SKIP_SERVER_REQUIREMENTS=1` skips the pip install of the server's requirements (brought
as wheels instead) and only checks that the server's modules import.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from gemma_serve.triton.server import PID_FILE, stop_recorded_server

logger = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[2]
BUILD_DIR = REPO_ROOT / "build"


def build_context(truss_dir: Path = REPO_ROOT, build_dir: Path = BUILD_DIR) -> Path:
    """`truss image build-context`: the Docker build context, written without Docker (or assembled from
    a saved truss server, see the module docstring)."""
    context = build_dir / "truss-context"
    if context.exists():
        shutil.rmtree(context)
    context.parent.mkdir(parents=True, exist_ok=True)
    saved = os.environ.get(SAVED_SERVER_ENV)
    if saved:
        return assemble_context(Path(saved), context, truss_dir)
    truss = Path(sys.executable).parent / "truss"
    cmd = [str(truss) if truss.exists() else "truss", "image", "build-context", str(context), str(truss_dir)]
    env = {**os.environ, "TRUSS_SKIP_UPDATE_CHECK": "1"}
    result = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if result.returncode != 0 or not (context / "server" / "main.py").exists():
        raise RuntimeError(f"`{' '.join(cmd)}` failed:\n{result.stdout}\n{result.stderr}")
    return context


SAVED_SERVER_ENV = "GEMMA_SERVE_TRUSS_SERVER"
SKIP_REQUIREMENTS_ENV = "GEMMA_SERVE_SKIP_SERVER_REQUIREMENTS"


def export_server(out_dir: Path, truss_dir: Path = REPO_ROOT) -> Path:
    """Save what the context takes from truss (its `server/` code and normalized `config.yaml`), for
    machines without truss: GEMMA_SERVE_TRUSS_SERVER=out_dir."""
    saved = os.environ.pop(SAVED_SERVER_ENV, None)  # this must come from truss itself
    try:
        with tempfile.TemporaryDirectory() as tmp:
            return _save(build_context(truss_dir, Path(tmp)), Path(out_dir))
    finally:
        if saved is not None:
            os.environ[SAVED_SERVER_ENV] = saved


def _save(context: Path, out_dir: Path) -> Path:
    if out_dir.exists():
        shutil.rmtree(out_dir)
    shutil.copytree(context / "server", out_dir / "server", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy2(context / "config.yaml", out_dir / "config.yaml")
    return out_dir


def _merged(base: dict, override: dict) -> dict:
    out = dict(base)
    for key, value in override.items():
        out[key] = _merged(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def assemble_context(saved: Path, context: Path, truss_dir: Path = REPO_ROOT) -> Path:
    """The parts of a build context that `layout()` uses: the saved server, and this checkout's model/,
    data/ and packages/; config.yaml is the saved normalized one with this checkout's values laid over
    it (so model_metadata and the rest follow the checkout)."""
    import yaml

    if not (saved / "server" / "main.py").exists() or not (saved / "config.yaml").exists():
        raise RuntimeError(f"{SAVED_SERVER_ENV}={saved} is not a saved truss server (server/main.py, config.yaml); "
                           "make one with `python -m gemma_serve.dev_server export-server DIR`")
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    shutil.copytree(saved / "server", context / "server", ignore=ignore)
    for name in ("model", "data", "packages"):
        shutil.copytree(truss_dir / name, context / name, ignore=ignore)
    normalized = yaml.safe_load((saved / "config.yaml").read_text()) or {}
    own = yaml.safe_load((truss_dir / "config.yaml").read_text()) or {}
    (context / "config.yaml").write_text(yaml.safe_dump(_merged(normalized, own), sort_keys=False))
    return context


def check_server_imports(server_dir: Path) -> None:
    """The truss server's modules import with this interpreter (its requirements are installed)."""
    result = subprocess.run([sys.executable, "-c", "import truss_server"], cwd=server_dir, capture_output=True,
                            text=True)
    if result.returncode != 0:
        raise RuntimeError(f"{SKIP_REQUIREMENTS_ENV} is set, but the truss server's modules do not import "
                           f"(bring its requirements, {server_dir / 'requirements.txt'}):\n{result.stderr[-3000:]}")


def install_server_requirements(server_dir: Path | None = None) -> None:
    """The truss server's own requirements, as its Dockerfile installs them (from the installed truss's
    server template, which is what `build-context` copies)."""
    if server_dir is None:
        import truss

        server_dir = Path(truss.__file__).parent / "templates" / "server"
    if os.environ.get(SKIP_REQUIREMENTS_ENV, "").lower() in ("1", "true", "yes"):
        check_server_imports(server_dir)
        return
    stamp = Path(sys.prefix) / ".gemma-serve-truss-server-requirements"
    reqs = (server_dir / "requirements.txt").read_text()
    if stamp.exists() and stamp.read_text() == reqs:
        return
    logger.info("installing the truss server's requirements")
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "-r", str(server_dir / "requirements.txt"),
                    "-c", str(server_dir / "constraints.txt")], check=True)
    stamp.write_text(reqs)


def layout(context: Path, build_dir: Path = BUILD_DIR) -> Path:
    """Arrange the context as the image does; returns the app directory (the image's /app)."""
    app = build_dir / "truss-app"
    if app.exists():
        shutil.rmtree(app)
    shutil.copytree(context / "server", app)
    shutil.copytree(context / "model", app / "model")
    shutil.copytree(context / "data", app / "data")
    shutil.copy2(context / "config.yaml", app / "config.yaml")
    # The image's /packages: truss puts it on sys.path; here it goes on PYTHONPATH.
    shutil.copytree(context / "packages", app / "packages")
    return app


@dataclass
class DevServer:
    """The Truss server process (and, through its `load()`, tritonserver)."""

    port: int = 8080
    env: dict[str, str] = field(default_factory=dict)
    build_dir: Path = BUILD_DIR
    log_path: Path | None = None  # None: inherit stdout/stderr
    process: subprocess.Popen | None = None
    app_dir: Path | None = None

    def prepare(self) -> Path:
        context = build_context(REPO_ROOT, self.build_dir)
        install_server_requirements(context / "server")
        self.app_dir = layout(context, self.build_dir)
        return self.app_dir

    @property
    def triton_workdir(self) -> Path:
        return self.build_dir / f"triton-{self.port}"

    def start(self) -> None:
        app = self.app_dir or self.prepare()
        if self.triton_workdir.exists():
            shutil.rmtree(self.triton_workdir)
        env = {
            **os.environ,
            "INFERENCE_SERVER_PORT": str(self.port),
            "PYTHONPATH": os.pathsep.join([str(app / "packages"), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep),
            "GEMMA_SERVE_WORKDIR": str(self.triton_workdir),
            **self.env,
        }
        out = open(self.log_path, "ab") if self.log_path else None
        self.process = subprocess.Popen([sys.executable, "main.py"], cwd=app, env=env, stdout=out,
                                        stderr=subprocess.STDOUT if out else None, start_new_session=True)
        if out:
            out.close()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def wait_ready(self, timeout_s: float = 600.0) -> None:
        """Until GET /v1/models/model answers 200 (the Truss finished load())."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process is None or self.process.poll() is not None:
                raise RuntimeError(f"the truss server exited with {self.process and self.process.returncode}"
                                   + (f"; log: {self.log_path}" if self.log_path else ""))
            try:
                with urllib.request.urlopen(f"{self.url}/v1/models/model", timeout=2) as resp:
                    if resp.status == 200:
                        return
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.5)
        raise TimeoutError(f"the truss server was not ready after {timeout_s:.0f} s")

    def stop(self) -> None:
        """SIGTERM the Truss server (its shutdown stops tritonserver); make sure nothing outlives it."""
        process, self.process = self.process, None
        if process is not None and process.poll() is None:
            os.killpg(process.pid, signal.SIGTERM)
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
        # tritonserver runs in its own session; if the Truss server died without stopping it, do it here.
        stop_recorded_server(self.triton_workdir / PID_FILE)


if __name__ == "__main__":
    # `python -m gemma_serve.dev_server` (make install): the server's requirements;
    # `python -m gemma_serve.dev_server export-server DIR`: a saved truss server for machines without truss.
    logging.basicConfig(level=logging.INFO)
    if sys.argv[1:2] == ["export-server"] and len(sys.argv) == 3:
        print(export_server(Path(sys.argv[2])))
    elif len(sys.argv) == 1:
        install_server_requirements()
    else:
        sys.exit("usage: python -m gemma_serve.dev_server [export-server DIR]")


def serve(port: int, env: dict[str, str]) -> int:
    """Foreground: prepare, run, and on Ctrl-C stop every process started."""
    server = DevServer(port=port, env=env)
    logger.info("preparing the truss server (truss image build-context) ...")
    server.prepare()
    server.start()
    stop_requested = False

    def handle(signum, frame):
        nonlocal stop_requested
        stop_requested = True

    signal.signal(signal.SIGINT, handle)
    signal.signal(signal.SIGTERM, handle)
    try:
        while not stop_requested and server.process is not None and server.process.poll() is None:
            time.sleep(0.2)
    finally:
        logger.info("stopping ...")
        code = server.process.returncode if server.process is not None else 0
        server.stop()
    return 0 if stop_requested else (code or 0)
