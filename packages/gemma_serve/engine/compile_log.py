"""Which Triton kernels get compiled (or loaded from Triton's disk cache) while a block of code runs.

A Triton kernel is compiled once per specialisation: its constexpr values, and for each integer
argument whether it is 1 or a multiple of 16. A step whose shapes the warm-up did not cover compiles
on the spot, for 0.3-1 s a kernel, inside a user's request. `CompileLog` records those compiles, so
that the warm-up can say what it compiled and a GPU test can check that serving compiles nothing
after it.

    with CompileLog() as log:
        engine.step()
    log.compiles  # [Compile(kernel='_paged_prefill_kernel', seconds=0.41, key='...'), ...]

It wraps `JITFunction._do_compile` (Triton 3.x); where that is missing, or in Triton's interpreter
(nothing compiles there), it records nothing and `supported` is False.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Compile:
    kernel: str
    seconds: float
    key: str  # the specialisation Triton compiled (argument types, divisibility, constexprs)


def _jit_function() -> Any | None:
    try:
        from triton.runtime.jit import JITFunction
    except ImportError:
        return None
    return JITFunction if hasattr(JITFunction, "_do_compile") else None


class CompileLog:
    def __init__(self) -> None:
        self.compiles: list[Compile] = []
        self._cls = _jit_function()
        self._original = None

    @property
    def supported(self) -> bool:
        return self._cls is not None

    @property
    def seconds(self) -> float:
        return sum(c.seconds for c in self.compiles)

    def summary(self) -> str:
        """'3 Triton kernels compiled in 1.2 s: _a (0.5 s), ...', or 'no Triton kernel compiled'."""
        if not self.compiles:
            return "no Triton kernel compiled"
        names = ", ".join(f"{c.kernel} ({c.seconds:.1f} s)" for c in self.compiles)
        return f"{len(self.compiles)} Triton kernels compiled in {self.seconds:.1f} s: {names}"

    def __enter__(self) -> CompileLog:
        if self._cls is None:
            return self
        original = self._original = self._cls._do_compile
        compiles = self.compiles

        def do_compile(fn: Any, key: Any, *args: Any, **kwargs: Any) -> Any:
            start = time.perf_counter()
            try:
                return original(fn, key, *args, **kwargs)
            finally:
                compiles.append(Compile(getattr(fn, "__name__", repr(fn)), time.perf_counter() - start, str(key)[:300]))

        self._cls._do_compile = do_compile
        return self

    def __exit__(self, *exc: object) -> None:
        if self._cls is not None and self._original is not None:
            self._cls._do_compile = self._original
            self._original = None
