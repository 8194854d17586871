"""Which jobs of a sweep may train together, and which of them carry its messages.

A packing sweep does not need a message per job: a worker that takes one of its messages
claims up to ``LRQ_PACK_MAX_MEMBERS`` queued jobs of the sweep that share its data and trains
them as one pack; a message whose job is already taken claims the sweep's next queued jobs
instead. So submit sends one message per pack's worth of jobs (a *carrier*), every job still
is its own row, claim and result. A worker that fills a pack and sees more queued sends one
more carrier, and the reconciler sends messages for queued jobs of a sweep the broker no
longer holds a message of.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any


def data_key(spec: dict[str, Any], dataset_id: str | None) -> str:
    """What a job's training arrays depend on: members of a pack share this."""
    data = spec.get("data", {})
    test = data.get("test") or {}
    model = spec.get("model", {})
    # A held-out fraction is drawn with the job's seed, so then the seed picks the rows too.
    seed = spec.get("seed") if test.get("fraction") is not None else None
    key = {
        "data": data,
        "dataset": dataset_id,
        "split_seed": seed,
        "fit_intercept": model.get("fit_intercept"),
        "device": spec.get("device"),
    }
    return json.dumps(key, sort_keys=True, default=str)


@dataclass(frozen=True)
class Queued:
    """A job as submit recorded it: what choosing its carriers needs."""

    id: str
    queue: str
    spec: dict[str, Any]
    dataset_id: str | None


def carriers(jobs: Sequence[Queued], *, pack: bool, max_members: int) -> list[tuple[str, str]]:
    """The (job id, queue) pairs to publish for one submit's jobs.

    Without packing every job gets its message. With it, the jobs that may pack (not pinned
    to the reference loop) are grouped by queue and data, in submit order, and every
    ``max_members``-th of a group carries a message for the pack's worth that follows it.
    """
    if not pack or max_members < 2:
        return [(job.id, job.queue) for job in jobs]
    chosen: list[tuple[str, str]] = []
    seen: dict[tuple[str, str], int] = {}
    for job in jobs:
        if job.spec.get("engine") == "loop":
            chosen.append((job.id, job.queue))
            continue
        group = (job.queue, data_key(job.spec, job.dataset_id))
        index = seen.get(group, 0)
        seen[group] = index + 1
        if index % max_members == 0:
            chosen.append((job.id, job.queue))
    return chosen
