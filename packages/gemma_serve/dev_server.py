"""Run the Truss locally with truss's own server code, no Docker.

`truss image build-context` writes what the Docker image would contain; this lays it out as the
image does (`/app/main.py`, `/app/model`, `/app/data`, `/app/config.yaml`, `/packages`), installs the
server's requirements into this interpreter, and runs `main.py`. The Truss's `load()` then starts
tritonserver, so one process tree serves: Truss server -> gRPC -> tritonserver -> engine.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import subprocess
import sys
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
    """`truss image build-context`: the Docker build context, written without Docker."""
    context = build_dir / "truss-context"
    if context.exists():
        shutil.rmtree(context)
    context.parent.mkdir(parents=True, exist_ok=True)
    truss = Path(sys.executable).parent / "truss"
    cmd = [str(truss) if truss.exists() else "truss", "image", "build-context", str(context), str(truss_dir)]
    env = {**os.environ, "TRUSS_SKIP_UPDATE_CHECK": "1"}
    result = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if result.returncode != 0 or not (context / "server" / "main.py").exists():
        raise RuntimeError(f"`{' '.join(cmd)}` failed:\n{result.stdout}\n{result.stderr}")
    return context


def install_server_requirements(server_dir: Path | None = None) -> None:
    """The truss server's own requirements, as its Dockerfile installs them (from the installed truss's
    server template, which is what `build-context` copies)."""
    if server_dir is None:
        import truss

        server_dir = Path(truss.__file__).parent / "templates" / "server"
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


if __name__ == "__main__":  # `python -m gemma_serve.dev_server install` (make install)
    logging.basicConfig(level=logging.INFO)
    install_server_requirements()


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
