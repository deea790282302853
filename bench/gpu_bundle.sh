#!/usr/bin/env bash
# What bench/gpu_full_stack.sh needs on a GPU machine that has no network, gathered here into .whl/
# (ignored by git; name it in the device call's `carry`):
#   - cp312 wheels of the Python packages that machine lacks: the truss server's own requirements
#     (fastapi, uvicorn, opentelemetry, ...), pydantic, tritonclient, and nvidia-pytriton for the
#     tritonserver binary, slimmed to the Python 3.12 backend stub (the full wheel alone is 55 MB of the
#     64 MiB a call carries; the stubs for other Pythons and their bundled libpython3.13 are 16 MB of it);
#   - .whl/truss-server: truss's server code and normalized config.yaml, since truss itself is not
#     installed there (dev_server.py: GEMMA_SERVE_TRUSS_SERVER).
# Run it from the repository root after `make install`:  bash bench/gpu_bundle.sh
set -euo pipefail

cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-.venv/bin/python}
DEST=.whl
mkdir -p "$DEST"
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >>.git/info/exclude

# The packages the GPU image lacks (docs: the device tool's KINDS.md list), at the versions `make install`
# puts in .venv, so the CPU tests cover the same code. Everything else they need is on the image.
WHEELS=(
    nvidia-pytriton==0.7.0 tritonclient==2.73.0 python-rapidjson==1.25
    pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5 typing-extensions==4.16.0
    fastapi==0.124.4 starlette==0.50.0 uvicorn==0.54.0 python-json-logger==4.2.0 msgpack-numpy==0.4.8
    opentelemetry-api==1.45.2 opentelemetry-sdk==1.45.2 opentelemetry-semantic-conventions==0.66b2
    opentelemetry-proto==1.45.2 opentelemetry-exporter-otlp-proto-common==1.45.2
    opentelemetry-exporter-otlp-proto-http==1.45.2 opentelemetry-exporter-http-transport==0.66b2
    opentelemetry-exporter-otlp-common==0.66b2 googleapis-common-protos==1.76.0
)
PLATFORMS=()
for n in 17 24 27 28 31 34 35; do PLATFORMS+=(--platform "manylinux_2_${n}_x86_64"); done
PLATFORMS+=(--platform manylinux2014_x86_64)

rm -f "$DEST"/*.whl
"$PYTHON" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    "${PLATFORMS[@]}" -d "$DEST" "${WHEELS[@]}"

# nvidia-pytriton, Python 3.12 only: drop the other backend stubs, libpython3.13 and pytriton's own
# Python API (find_triton() only locates the package; it never imports it).
"$PYTHON" - "$DEST" <<'EOF'
import base64, hashlib, sys, zipfile
from pathlib import Path

dest = Path(sys.argv[1])
[src] = dest.glob("nvidia_pytriton-0.7.0-*.whl")
# A build tag marks the slim wheel; name and version stay, so pip installs it as nvidia-pytriton 0.7.0.
out = src.with_name(src.name.replace("0.7.0-", "0.7.0-1py312-"))


def keep(name: str) -> bool:
    if name.startswith("pytriton/tritonserver/python_backend_stubs/"):
        return "/3.12/" in name
    if name.startswith("nvidia_pytriton.libs/libpython3"):
        return False
    if name.startswith("pytriton/") and not name.startswith("pytriton/tritonserver/"):
        return name == "pytriton/__init__.py"
    return not name.endswith(".dist-info/RECORD")


with zipfile.ZipFile(src) as zin, zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED, compresslevel=9) as zout:
    record, dist_info = [], None
    for info in zin.infolist():
        if info.filename.endswith(".dist-info/RECORD"):
            dist_info = info.filename.rsplit("/", 1)[0]
        if not keep(info.filename):
            continue
        data = zin.read(info)
        zout.writestr(info, data, compress_type=zipfile.ZIP_DEFLATED, compresslevel=9)
        digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
        record.append(f"{info.filename},sha256={digest},{len(data)}")
    record.append(f"{dist_info}/RECORD,,")
    zout.writestr(f"{dist_info}/RECORD", "\n".join(record) + "\n")
src.unlink()
print(f"{out.name}: {out.stat().st_size / 2**20:.1f} MiB")
EOF

"$PYTHON" -m gemma_serve.dev_server export-server "$DEST/truss-server" >/dev/null
du -sh "$DEST"
echo "tracked files: $(git ls-files -z | du -ch --files0-from=- | tail -1 | cut -f1)"
