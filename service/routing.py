"""Where a ``device: auto`` job goes: the gpu queue when a live GPU worker exists and each step's
batch is large enough to gain from a GPU, else the cpu queue (see README, "device: auto")."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from service.spec import JobSpec


def batch_elements(spec: JobSpec, *, rows: int, features: int) -> int:
    """Values one optimizer step reads: batch rows (all training rows for full batch) x features."""
    return (spec.batch_size or rows) * features


def wants_gpu(spec: JobSpec, *, rows: int, features: int, min_elements: int) -> bool:
    """An auto torch job whose steps are big enough for a GPU to beat the CPU."""
    return (
        spec.device == "auto"
        and spec.backend == "torch"
        and batch_elements(spec, rows=rows, features=features) >= min_elements
    )


def gpu_worker_live(app: Any, timeout: float = 1.0) -> bool:
    """Whether some live worker consumes the gpu queue."""
    from service.monitor import worker_details

    try:
        return any("gpu" in worker.queues for worker in worker_details(app, timeout=timeout))
    except Exception:
        return False  # the broker cannot say: the cpu queue is always a safe place


class AutoRouter:
    """Asks the broker about GPU workers at most once per submission, and only if needed."""

    def __init__(self, ask: Callable[[], bool]) -> None:
        self.ask = ask
        self.answer: bool | None = None

    def queue(self, spec: JobSpec, *, rows: int, features: int, min_elements: int) -> str:
        if not wants_gpu(spec, rows=rows, features=features, min_elements=min_elements):
            return spec.queue
        if self.answer is None:
            self.answer = self.ask()
        return "gpu" if self.answer else "cpu"
