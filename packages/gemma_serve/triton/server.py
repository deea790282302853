"""`TritonServer`: owns one `tritonserver` process, from start to a stop that leaves nothing behind.

Production runs the NGC image's `/opt/tritonserver/bin/tritonserver`. Elsewhere the binary that the
`nvidia-pytriton` wheel ships is used: it needs the Python backend stub that matches this interpreter
copied beside the backend, this interpreter's `libpython` first on `LD_LIBRARY_PATH` (the stub
otherwise links the system's, which fails on a different patch release) and the wheel's bundled
libraries after it (`../shared/FIELD-NOTES.md`).
"""

from __future__ import annotations

import atexit
import importlib.util
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import time
import urllib.error
import urllib.request
from collections import deque
from dataclasses import dataclass
from pathlib import Path

logger = logging.getLogger(__name__)

NGC_TRITONSERVER = Path("/opt/tritonserver/bin/tritonserver")
PID_FILE = "tritonserver.pid"


class TritonServerError(RuntimeError):
    """tritonserver could not be started, died, or did not become ready; the message has its log tail."""


@dataclass(frozen=True)
class TritonInstallation:
    binary: Path
    backend_directory: Path | None  # None: the binary's built-in default
    env: dict[str, str]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def find_triton(workdir: Path) -> TritonInstallation:
    """The NGC image's tritonserver if present, else the `nvidia-pytriton` wheel's, prepared in `workdir`."""
    if NGC_TRITONSERVER.exists():
        return TritonInstallation(NGC_TRITONSERVER, None, {})
    # Located, not imported: importing pytriton pulls in its whole client stack, which we do not use.
    spec = importlib.util.find_spec("pytriton")
    if spec is None or not spec.submodule_search_locations:
        raise TritonServerError(
            "no tritonserver found: not in the NGC image (/opt/tritonserver) and the `nvidia-pytriton` "
            "wheel is not installed (pip install -r requirements-dev.txt)")
    package_dir = Path(list(spec.submodule_search_locations)[0])
    dist = package_dir / "tritonserver"
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    stub = dist / "python_backend_stubs" / version / "triton_python_backend_stub"
    if not stub.exists():
        raise TritonServerError(f"the nvidia-pytriton wheel has no Python backend stub for Python {version}")
    backends = workdir / "backends"
    if not (backends / "python" / "triton_python_backend_stub").exists():
        shutil.copytree(dist / "backends", backends, dirs_exist_ok=True)
        shutil.copy2(stub, backends / "python" / "triton_python_backend_stub")
    libs = [sysconfig.get_config_var("LIBDIR") or "", str(package_dir.parent / "nvidia_pytriton.libs")]
    if os.environ.get("LD_LIBRARY_PATH"):
        libs.append(os.environ["LD_LIBRARY_PATH"])
    env = {
        "LD_LIBRARY_PATH": os.pathsep.join(p for p in libs if p),
        # The stub finds its interpreter (and so the virtualenv's site-packages) through PATH.
        "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]),
    }
    return TritonInstallation(dist / "bin" / "tritonserver", backends, env)


def stop_recorded_server(pid_path: Path) -> None:
    """Stop the tritonserver whose pid `pid_path` records, with its backend stubs, if it still runs.
    For servers whose owner is gone: a retried load(), or a Truss server that was killed."""
    try:
        pid = int(pid_path.read_text())
    except (OSError, ValueError):
        return
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(pid, sig)  # the server leads its own process group
        except (ProcessLookupError, PermissionError):
            break
        logger.warning("stopping a leftover tritonserver (pid %d, %s)", pid, sig.name)
        time.sleep(1)
    pid_path.unlink(missing_ok=True)


class TritonServer:
    """A tritonserver process serving `model_repository` over gRPC and HTTP."""

    def __init__(
        self,
        model_repository: Path,
        workdir: Path,
        *,
        grpc_port: int = 8001,
        http_port: int = 8000,
        metrics_port: int = 8002,
        startup_timeout_s: float = 600.0,
        log_verbose: int = 0,
        extra_env: dict[str, str] | None = None,
    ) -> None:
        self.model_repository = Path(model_repository)
        self.workdir = Path(workdir)
        self.grpc_port = grpc_port or free_port()
        self.http_port = http_port or free_port()
        self.metrics_port = metrics_port or free_port()
        self.startup_timeout_s = startup_timeout_s
        self.log_verbose = log_verbose
        self.extra_env = dict(extra_env or {})
        self.log_path = self.workdir / "tritonserver.log"
        # Lets a supervisor (dev_server) clean up if this process dies without calling stop().
        self.pid_path = self.workdir / PID_FILE
        self._process: subprocess.Popen | None = None

    @property
    def grpc_url(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.metrics_port}/metrics"

    @property
    def alive(self) -> bool:
        return self._process is not None and self._process.poll() is None

    @property
    def ready(self) -> bool:
        if not self.alive:
            return False
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.http_port}/v2/health/ready", timeout=2) as resp:
                return resp.status == 200
        except (urllib.error.URLError, OSError):
            return False

    def command(self, installation: TritonInstallation) -> list[str]:
        cmd = [
            str(installation.binary),
            f"--model-repository={self.model_repository}",
            f"--grpc-port={self.grpc_port}",
            f"--http-port={self.http_port}",
            f"--metrics-port={self.metrics_port}",
            "--allow-metrics=true",
            "--allow-gpu-metrics=false",
            # Model loading (weights, warm-up) happens in the Python backend's initialize().
            "--backend-config=python,stub-timeout-seconds=600",
            "--exit-on-error=true",
            "--disable-auto-complete-config",
            f"--log-verbose={self.log_verbose}",
        ]
        if installation.backend_directory is not None:
            cmd.append(f"--backend-directory={installation.backend_directory}")
        return cmd

    def start(self, wait: bool = True) -> None:
        if self.alive:
            return
        self.workdir.mkdir(parents=True, exist_ok=True)
        # A server recorded here by an earlier attempt (Truss retries a failed load()).
        stop_recorded_server(self.pid_path)
        installation = find_triton(self.workdir)
        env = {**os.environ, **installation.env, **self.extra_env}
        cmd = self.command(installation)
        logger.info("starting tritonserver: %s (log: %s)", " ".join(cmd), self.log_path)
        log = open(self.log_path, "wb")
        try:
            self._process = subprocess.Popen(
                cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                # Own process group, so stop() reaches the backend stubs too. (No PR_SET_PDEATHSIG: it
                # fires when the *thread* that forked exits, and Truss runs load() in a worker thread.)
                start_new_session=True,
            )
        finally:
            log.close()
        self.pid_path.write_text(str(self._process.pid))
        atexit.register(self.stop)
        if wait:
            self.wait_until_ready()

    def wait_until_ready(self, timeout_s: float | None = None) -> None:
        """Poll readiness; fail fast with the log tail if the process exits or the time runs out."""
        deadline = time.monotonic() + (timeout_s or self.startup_timeout_s)
        last_report = time.monotonic()
        while time.monotonic() < deadline:
            if not self.alive:
                code = None if self._process is None else self._process.returncode
                raise TritonServerError(f"tritonserver exited with code {code} before it was ready.\n{self.log_tail()}")
            if self.ready:
                logger.info("tritonserver ready (grpc %s)", self.grpc_url)
                return
            if time.monotonic() - last_report > 15:
                last_report = time.monotonic()
                logger.info("waiting for tritonserver to load its models ... last log line: %s",
                            self.log_tail(1).strip())
            time.sleep(0.25)
        tail = self.log_tail()
        self.stop()
        raise TritonServerError(
            f"tritonserver was not ready after {timeout_s or self.startup_timeout_s:.0f} s "
            f"(raise triton_startup_timeout_s if the model is large).\n{tail}"
        )

    def log_tail(self, lines: int = 40) -> str:
        try:
            with open(self.log_path, "rb") as f:
                tail = deque(f, maxlen=lines)
        except OSError:
            return "(no tritonserver log)"
        return b"".join(tail).decode("utf-8", errors="replace")

    def stop(self, timeout_s: float = 15.0) -> None:
        """SIGTERM the process group (server and backend stubs), SIGKILL whatever is left."""
        process, self._process = self._process, None
        if process is None:
            return
        atexit.unregister(self.stop)
        if process.poll() is None:
            try:
                os.killpg(process.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                process.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                logger.warning("tritonserver did not stop in %.0f s; killing it", timeout_s)
        # Stubs live in the same process group; make sure none outlives the server.
        try:
            os.killpg(process.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        process.wait()
        self.pid_path.unlink(missing_ok=True)

    def __enter__(self) -> "TritonServer":
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
