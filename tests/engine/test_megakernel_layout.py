"""The experimental CUDA kernels (engine/csrc/) are called through ctypes with structs and argument
lists built in Python: a field out of place there reads one pointer as another on the GPU. These
checks compare the Python side with the .cu files, and run without a GPU or nvcc."""

from __future__ import annotations

import ctypes
import re

import pytest

from gemma_serve.engine import cuda_gemv, megakernel


def c_struct_fields(name: str) -> list[tuple[str, str]]:
    """(type, field) of each member of `struct name` in the kernel's source, in order."""
    source = megakernel.SOURCE.read_text()
    body = re.search(rf"struct {name} \{{(.*?)\n\}};", source, re.S)
    assert body, f"struct {name} not found"
    fields = []
    for line in body.group(1).splitlines():
        code = line.split("//")[0].strip()
        if not code:
            continue
        assert code.endswith(";"), code
        first, *more = code[:-1].split(",")
        name = re.search(r"(\w+)$", first.strip()).group(1)
        ctype = first.strip()[: -len(name)].strip()
        fields.append((ctype, name))
        fields.extend((ctype, extra.strip()) for extra in more)
    return fields


def test_params_struct_matches_ctypes() -> None:
    c_fields = c_struct_fields("Params")
    py_fields = megakernel._Params._fields_
    assert [f for _, f in c_fields] == [f for f, _ in py_fields]
    for (ctype, field), (_, pytype) in zip(c_fields, py_fields):
        if "*" in ctype:
            assert pytype is ctypes.c_void_p, field
        elif ctype == "long long":
            assert pytype is ctypes.c_longlong, field
        else:
            assert ctype == "float" and pytype is ctypes.c_float, field


def test_layer_table_matches_struct() -> None:
    c_fields = c_struct_fields("LayerWeights")
    assert [f for _, f in c_fields] == [c for c, _ in megakernel.LAYER_FIELDS]
    # Every member is 8 bytes: pointers and one long long, read from an int64 table.
    assert all("*" in t or t == "long long" for t, _ in c_fields)
    attrs = {f.name for f in megakernel.LayerTensors.__dataclass_fields__.values()}
    assert {a for _, a in megakernel.LAYER_FIELDS} == attrs


@pytest.mark.parametrize("name", ["Params", "LayerWeights"])
def test_parser_sees_every_member(name: str) -> None:
    # A guard on the parser itself: the member count equals the ';'-terminated lines of the struct.
    source = megakernel.SOURCE.read_text()
    body = re.search(rf"struct {name} \{{(.*?)\n\}};", source, re.S).group(1)
    declared = sum(line.split("//")[0].count(",") + 1 for line in body.splitlines() if ";" in line.split("//")[0])
    assert len(c_struct_fields(name)) == declared


def test_gemv_launch_arguments_match() -> None:
    source = cuda_gemv.SOURCE.read_text()
    sig = re.search(r"int one_token_gemv_launch\((.*?)\)\s*\{", source, re.S).group(1)
    params = [" ".join(p.split()) for p in sig.split(",")]
    # The wrapper's call passes these in this order; its argtypes list must have one entry each.
    expected = ["const void* W", "const float* scale", "const void* x", "void* y", "int n_out", "int K", "int gelu",
                "int wbf16", "int out_bf16", "int blocks", "int pdl", "cudaStream_t stream"]
    assert params == expected
    wrapper = cuda_gemv.SOURCE.with_suffix("").parent.parent / "cuda_gemv.py"
    argtypes = re.search(r"argtypes = \[(.*?)\]", wrapper.read_text(), re.S).group(1)
    assert argtypes.count("ctypes.c_") == len(expected)
