"""Which engine trains a spec, and why: ``fused`` where it can, else the ``loop`` reference."""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass

from service.errors import SpecError
from service.spec import JobSpec


@dataclass(frozen=True)
class Choice:
    engine: str  # "fused" | "loop"
    place: str  # "cpu": the compiled kernels; "device": torch on the spec's device
    reason: str


def compiled_kernels_available() -> bool:
    """Whether numba, which the fused engine's kernels need, is installed."""
    return importlib.util.find_spec("numba") is not None


def choose(spec: JobSpec, *, cuda: bool, compiled: bool | None = None) -> Choice:
    """The engine for ``spec`` on a host that has (``cuda``) a CUDA device or not."""
    on_device = spec.device == "cuda" or (spec.device == "auto" and cuda)
    place = "device" if on_device else "cpu"
    if spec.engine == "loop":
        return Choice("loop", place, "the spec asks for the reference loop")
    if not (compiled_kernels_available() if compiled is None else compiled):
        refusal = "the fused engine needs numba, which is not installed here"
        if spec.engine == "fused":
            raise SpecError(f"engine: fused cannot run this spec ({refusal})")
        return Choice("loop", place, refusal)
    asked = "the spec asks for the fused engine" if spec.engine == "fused" else "auto"
    where = "torch on the cuda device" if on_device else "compiled kernels on the cpu"
    return Choice("fused", place, f"{asked}: {where}")
