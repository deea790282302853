"""What the one-token kernel's K loop compiles to for an sm_90 GPU, on a machine without one.

Compiles `quantization._weight_only_gemv_kernel` with the engine's tiles for Gemma 3 4B's
projections (and the INT8 LM head), bf16 and INT8 weights (both INT8 widenings: float-add and
half2, and half2 for 2 and 4 tokens at once), using the ptxas that ships with Triton, and prints per variant: registers, instructions in
the K loop, and the loop's global loads, shared-memory traffic and barriers. A shared-memory round
trip with barriers in the loop is a layout change Triton inserted between the weight tile and x.

    PYTHONPATH=packages python bench/gemv_sass.py                      # this environment's Triton
    pip install --target /tmp/t36 triton==3.6.0                         # the GPU image's Triton
    PYTHONPATH=/tmp/t36:packages python bench/gemv_sass.py

Integers divisible by 16 and every pointer are declared 16-divisible, as Triton's launcher specializes
them at run time (without that, no load is vectorized and the listing says nothing about the GPU).
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import subprocess
import sys
import tempfile

os.environ["TRITON_INTERPRET"] = "0"  # compile, even where the test setup interprets

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from gemma_serve.engine import quantization as quant  # noqa: E402

_POINTER = {torch.bfloat16: "*bf16", torch.float32: "*fp32", torch.int8: "*i8", torch.int32: "*i32", torch.int64: "*i64"}
_TOOLS = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
# (name, N, K, gate_up with the GELU epilogue) of Gemma 3 4B's projections and its LM head.
SHAPES = [("qkv", 4096, 2560, False), ("o", 2560, 2048, False), ("gate_up+GELU", 20480, 2560, True),
          ("down", 2560, 10240, False), ("LM head", 262144, 2560, False)]


def compile_sm90(fn, args: dict, num_warps: int, num_stages: int):
    """Triton's compiler on `fn` with these argument values (tensors stand for pointers of their
    dtype), for compute capability 9.0."""
    signature, constants, attrs = {}, {}, {}
    for i, p in enumerate(fn.params):
        value = args.get(p.name, p.default)
        if p.is_constexpr:
            signature[p.name] = "constexpr"
            constants[(i,)] = value
            continue
        if isinstance(value, torch.Tensor):
            signature[p.name] = _POINTER[value.dtype]
        elif isinstance(value, bool):
            signature[p.name] = "i1"
        elif isinstance(value, int):
            signature[p.name] = "i32"
        else:
            signature[p.name] = "fp32"
        if isinstance(value, torch.Tensor) or (type(value) is int and value % 16 == 0):
            attrs[(i,)] = [["tt.divisibility", 16]]
    source = ASTSource(fn, signature, constants, attrs)
    return triton.compile(source, target=GPUTarget("cuda", 90, 32),
                          options={"num_warps": num_warps, "num_stages": num_stages})


def _tool(name: str, cubin: bytes, *flags: str) -> str:
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        return subprocess.run([os.path.join(_TOOLS, name), *flags, f.name], capture_output=True, text=True,
                              check=True).stdout


def loop_profile(sass: str) -> tuple[int, dict[str, int]]:
    """(instructions, memory and barrier operations) of the longest backward branch's body: the K loop."""
    lines = sass.splitlines()
    labels = {m.group(1): i for i, line in enumerate(lines) if (m := re.match(r"\s*(\.L_x_\d+):", line))}
    body: list[str] = []
    for i, line in enumerate(lines):
        m = re.search(r"BRA\s+`?\(?(\.L_x_\d+)", line)
        if m and labels.get(m.group(1), i) < i and i + 1 - labels[m.group(1)] > len(body):
            body = lines[labels[m.group(1)]:i + 1]
    ops = collections.Counter(re.findall(r"\b((?:LDG|LDS|STS|STSM|LDSM|BAR)[.\w]*)\b", "\n".join(body)))
    return sum(1 for line in body if ";" in line and "/*" in line), dict(ops)


def main(argv: list[str] | None = None) -> int:
    argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter).parse_args(argv)
    print(f"Triton {triton.__version__}, sm_90")
    x, f32 = torch.empty(1, dtype=torch.bfloat16), torch.empty(1, dtype=torch.float32)
    for method in ("bf16", "int8"):
        weight = torch.empty(1, dtype=torch.bfloat16 if method == "bf16" else torch.int8)
        for name, n, k, gelu in SHAPES:
            if method == "bf16" and name == "LM head":
                continue  # a 16-bit LM head runs on cuBLAS
            cfg = quant.one_token_config(n, k) if method == "bf16" else quant.kernel_config(1, n, k, 132)
            variants = [("float-add" if method == "int8" else "16-bit", quant._WIDEN_INT8 if method == "int8" else 0)]
            if method == "int8":
                variants.append(("half2", quant._WIDEN_INT8_HALF2))
            if method == "int8" and not gelu:
                variants += [("half2 x2", quant._WIDEN_INT8_HALF2, 2), ("half2 x4", quant._WIDEN_INT8_HALF2, 4)]
            for label, widen, *tokens in variants:
                args = dict(X=x, W=weight, S=f32, OUT=f32, N=n // 2 if gelu else n, K=k, stride_wn=k,
                            stride_split=n, split_k=cfg.split_k, stride_xm=k, stride_om=n // 2 if gelu else n,
                            BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, EVEN_K=k % cfg.block_k == 0, WIDEN=widen,
                            HAS_SCALE=method == "int8", GELU_MUL=gelu, M_TOK=tokens[0] if tokens else 1, PDL=True)
                kernel = compile_sm90(quant._weight_only_gemv_kernel, args, cfg.num_warps, cfg.num_stages)
                cubin = kernel.asm["cubin"]
                registers = re.search(r"REG:(\d+)", _tool("cuobjdump", cubin, "-res-usage")).group(1)
                count, ops = loop_profile(_tool("nvdisasm", cubin, "-c"))
                print(f"{method:4s} {name:12s} {cfg.block_n}x{cfg.block_k} w{cfg.num_warps} s{cfg.num_stages} "
                      f"{label:10s}: {registers:>3s} registers, K loop {count:3d} instructions, "
                      f"{' '.join(f'{op} x{c}' for op, c in sorted(ops.items()))}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
