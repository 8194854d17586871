"""Which engine trains a spec, and why: ``fused`` where it can, else the ``loop`` reference."""

from __future__ import annotations

from dataclasses import dataclass

from service.errors import SpecError
from service.spec import JobSpec


@dataclass(frozen=True)
class Choice:
    engine: str  # "fused" | "loop"
    reason: str


def fused_refusal(spec: JobSpec, *, cuda: bool) -> str | None:
    """Why the fused engine cannot run ``spec`` here, or None when it can."""
    if spec.device == "cuda" or (spec.device == "auto" and cuda):
        return "the fused engine runs on the cpu only; cuda runs use the loop"
    try:
        import numba  # noqa: F401
    except ImportError:
        return "the fused engine needs numba, which is not installed"
    return None


def choose(spec: JobSpec, *, cuda: bool) -> Choice:
    """The engine for ``spec`` on a host that has (``cuda``) a CUDA device or not."""
    if spec.engine == "loop":
        return Choice("loop", "the spec asks for the reference loop")
    refusal = fused_refusal(spec, cuda=cuda)
    if spec.engine == "fused":
        if refusal is not None:
            raise SpecError(f"engine: fused cannot run this spec ({refusal})")
        return Choice("fused", "the spec asks for the fused engine")
    if refusal is not None:
        return Choice("loop", refusal)
    return Choice("fused", "the fused engine does this spec's mathematics at the data's cost")
