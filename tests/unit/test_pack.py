"""Packed sweeps: every member of a pack equals the same job run alone."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import event, given, settings
from hypothesis import strategies as st

from service.packing import data_key
from service.spec import JobSpec
from tests.unit.test_engines import (
    assert_close,
    final_params,
    keep_snapshots,
    make_data,
    make_spec,
    random_runs,
    stop_after,
)
from workers.engines import train
from workers.engines.base import Checkpoint, RunResult, TrainData
from workers.engines.epochs import run_epochs
from workers.engines.fused_torch import TorchFusedEngine
from workers.engines.pack import Member, pack_place, packable, train_pack

#: The issue's bound; the pack computes each member's own operations, so it is met with room.
REL = 1e-12


def without_timing(checkpoint: Checkpoint) -> Checkpoint:
    return {k: v for k, v in checkpoint.items() if k != "train_seconds"}


def assert_same(packed: RunResult, solo: RunResult) -> None:
    assert packed.status == solo.status
    assert packed.summary.get("diverged_at") == solo.summary.get("diverged_at")
    assert [r.epoch for r in packed.history] == [r.epoch for r in solo.history]
    assert_close(packed.losses, solo.losses, REL)
    assert_same_values([r.test_loss for r in packed.history], [r.test_loss for r in solo.history])
    assert_close(final_params(packed), final_params(solo), REL)
    assert packed.summary["epochs_done"] == solo.summary["epochs_done"]
    assert packed.summary["engine"] == solo.summary["engine"] == "fused"
    keys = ("final_loss", "test_loss", "optimum_loss", "r2")
    assert_same_values([packed.summary[k] for k in keys], [solo.summary[k] for k in keys])


def assert_same_values(actual: list[float | None], expected: list[float | None]) -> None:
    assert [a is None for a in actual] == [e is None for e in expected]
    assert [a for a in actual if a is not None] == pytest.approx(
        [e for e in expected if e is not None], rel=REL
    )


@st.composite
def packs(draw: st.DrawFn) -> tuple[TrainData, list[JobSpec], list[int | None]]:
    """A dataset and members on it differing in every option, some divergent, some cancelled."""
    base, data = draw(random_runs())
    n = len(data.y)
    specs: list[JobSpec] = []
    cancels: list[int | None] = []
    for _ in range(draw(st.integers(1, 6))):
        momentum = draw(st.sampled_from([0.0]) | st.floats(0.1, 0.9))
        nesterov = momentum > 0 and draw(st.booleans())
        optimizer = {
            "lr": base.optimizer.lr * draw(st.sampled_from([1.0]) | st.floats(0.2, 2.0)),
            "momentum": momentum,
            "dampening": 0.0 if nesterov else draw(st.sampled_from([0.0, 0.3])),
            "weight_decay": draw(st.sampled_from([0.0, 1e-3])),
            "nesterov": nesterov,
        }
        update: dict[str, Any] = {"epochs": draw(st.integers(1, 20))}
        if draw(st.integers(0, 4)) == 0:
            # Far past the stability limit: this member diverges, alone.
            optimizer["lr"] *= draw(st.floats(400, 5000))
            update["epochs"] = draw(st.integers(30, 90))
        if draw(st.booleans()):
            # Another batch order: a member of another group in the same pack.
            update["batch_size"] = draw(st.none() | st.integers(1, n))
            update["shuffle"] = draw(st.booleans())
        if draw(st.booleans()):
            update["model"] = base.model.model_copy(update={"init": "default"})
        update["backend"] = draw(st.sampled_from(["torch", "numpy"]))
        update["optimizer"] = base.optimizer.model_copy(update=optimizer)
        specs.append(base.model_copy(update=update))
        cancels.append(draw(st.none() | st.integers(1, 10)))
    return data, specs, cancels


def run_pack(
    data: TrainData,
    specs: list[JobSpec],
    cancels: list[int | None],
    chunk: int,
    device: torch.device | None = None,
) -> tuple[dict[str, RunResult], dict[str, list[Checkpoint]]]:
    kept: dict[str, list[Checkpoint]] = {str(i): [] for i in range(len(specs))}
    members = [
        Member(
            str(i),
            spec,
            on_epoch=keep_snapshots(kept[str(i)]),
            should_stop=None if cancel is None else stop_after(cancel),
        )
        for i, (spec, cancel) in enumerate(zip(specs, cancels, strict=True))
    ]
    result = train_pack(members, data, chunk_epochs=chunk, chunk_seconds=60.0, device=device)
    assert result.errors == {}
    return result.results, kept


@settings(max_examples=150, deadline=None)
@given(packs(), st.integers(1, 7))
def test_packed_members_equal_their_solo_runs(
    pack: tuple[TrainData, list[JobSpec], list[int | None]], chunk: int
) -> None:
    data, specs, cancels = pack
    results, kept = run_pack(data, specs, cancels, chunk)
    for index, (spec, cancel) in enumerate(zip(specs, cancels, strict=True)):
        solo_kept: list[Checkpoint] = []
        solo = train(
            spec,
            data,
            on_epoch=keep_snapshots(solo_kept),
            should_stop=None if cancel is None else stop_after(cancel),
            chunk_epochs=chunk + 2,
        )
        packed = results[str(index)]
        event(f"{solo.status}")
        assert_same(packed, solo)
        # Each member's slice of the pack's state is the checkpoint its solo run writes.
        assert [without_timing(c) for c in kept[str(index)]] == [
            without_timing(c) for c in solo_kept
        ]


@settings(max_examples=40, deadline=None)
@given(packs(), st.integers(1, 5), st.data())
def test_a_member_resumed_alone_or_in_another_pack_continues_exactly(
    pack: tuple[TrainData, list[JobSpec], list[int | None]], chunk: int, data_: st.DataObject
) -> None:
    data, specs, _ = pack
    results, kept = run_pack(data, specs, [None] * len(specs), chunk)
    resumed: list[Member] = []
    for index, spec in enumerate(specs):
        snapshots = kept[str(index)]
        if results[str(index)].status != "succeeded" or len(snapshots) < 2:
            continue
        at = data_.draw(st.integers(0, len(snapshots) - 2))
        resumed.append(Member(str(index), spec, resume=snapshots[at]))
    if not resumed:
        return
    again = train_pack(resumed, data, chunk_epochs=chunk, chunk_seconds=60.0)
    alone = train_pack(resumed[:1], data, chunk_epochs=chunk + 1, chunk_seconds=60.0)
    for member in resumed:
        full = results[member.key]
        tail = again.results[member.key]
        assert tail.status == "succeeded"
        done = len(full.history) - len(tail.history)
        assert_close(tail.losses, full.losses[done:], REL)
        assert_close(final_params(tail), final_params(full), REL)
    first = resumed[0]
    assert alone.results[first.key].losses == again.results[first.key].losses


def test_a_pack_shares_one_statistics_pass_and_members_differ_only_in_options() -> None:
    rng = np.random.default_rng(4)
    data = make_data(rng, 500, 3, n_test=50)
    specs = [
        make_spec(data, optimizer={"lr": lr}, epochs=30, batch_size=32, seed=5)
        for lr in (1e-3, 3e-3, 1e-2)
    ]
    result = train_pack(
        [Member(str(i), s) for i, s in enumerate(specs)], data, chunk_epochs=8, chunk_seconds=9
    )
    losses = [result.results[str(i)].losses for i in range(3)]
    assert losses[0] != losses[1] != losses[2]
    for i, spec in enumerate(specs):
        assert result.results[str(i)].losses == train(spec, data).losses


def test_a_member_refused_before_training_fails_alone() -> None:
    rng = np.random.default_rng(5)
    data = make_data(rng, 40, 2)
    good = make_spec(data, epochs=5, seed=1)
    kept: list[Checkpoint] = []
    train(good, data, on_epoch=keep_snapshots(kept))
    other_seed = good.model_copy(update={"seed": 2})
    result = train_pack(
        [Member("good", good), Member("bad", other_seed, resume=kept[1])],
        data,
        chunk_epochs=2,
        chunk_seconds=9,
    )
    assert "resume: checkpoint seed 1" in result.errors["bad"]
    assert set(result.results) == {"good"}
    assert result.results["good"].losses == train(good, data).losses


def test_only_the_fused_engine_packs_and_the_data_key_names_what_the_arrays_depend_on() -> None:
    rng = np.random.default_rng(6)
    data = make_data(rng, 40, 2)
    spec = make_spec(data)
    assert packable(spec) and pack_place(spec, cuda=False) == "cpu"
    assert not packable(spec.model_copy(update={"engine": "loop"}))
    # Where the spec would run on a CUDA device, its pack runs there, as stacked tensors.
    on_gpu = spec.model_copy(update={"device": "auto"})
    assert packable(on_gpu, cuda=True) and pack_place(on_gpu, cuda=True) == "device"
    assert pack_place(on_gpu, cuda=False) == "cpu"
    pinned = spec.model_copy(update={"device": "cpu"})
    assert packable(pinned, cuda=True) and pack_place(pinned, cuda=True) == "cpu"
    document = spec.to_json()
    other_seed = {**document, "seed": document["seed"] + 1, "optimizer": {"lr": 0.5}}
    assert data_key(document, None) == data_key(other_seed, None)
    split = {**document, "data": {**document["data"], "test": {"fraction": 0.2}}}
    split_seed = {**split, "seed": split["seed"] + 1}
    assert data_key(split, None) != data_key(split_seed, None)
    assert data_key(document, None) != data_key(document, "abc")


def test_a_cancel_before_a_divergence_later_in_the_same_chunk_is_a_cancel() -> None:
    rng = np.random.default_rng(7)
    data = make_data(rng, 30, 2)
    spec = make_spec(data, optimizer={"lr": 50.0}, epochs=200)
    alone = train(spec, data)
    assert alone.status == "diverged" and alone.summary["diverged_at"] > 2
    stopped = train(spec, data, should_stop=stop_after(2), chunk_epochs=500)
    assert stopped.status == "cancelled"
    assert [r.epoch for r in stopped.history] == [1, 2]
    # The divergence came after the epoch the run stopped at: it is no part of this run.
    assert "diverged_at" not in stopped.summary


def solo_on_device(
    spec: JobSpec,
    data: TrainData,
    device: torch.device,
    kept: list[Checkpoint],
    cancel: int | None,
    chunk: int,
) -> RunResult:
    """The spec alone on the fused engine's torch code on ``device``."""
    return run_epochs(
        spec,
        data,
        TorchFusedEngine(spec, data, device=device),
        on_epoch=keep_snapshots(kept),
        should_stop=None if cancel is None else stop_after(cancel),
        resume=None,
        chunk_epochs=chunk,
        chunk_seconds=60.0,
    )


def device_pack_equals_solo_runs(
    pack: tuple[TrainData, list[JobSpec], list[int | None]], chunk: int, device: torch.device
) -> list[str]:
    """Checks each member against its solo run on ``device``; returns the solo statuses."""
    data, specs, cancels = pack
    results, kept = run_pack(data, specs, cancels, chunk, device=device)
    statuses: list[str] = []
    for index, (spec, cancel) in enumerate(zip(specs, cancels, strict=True)):
        solo_kept: list[Checkpoint] = []
        solo = solo_on_device(spec, data, device, solo_kept, cancel, chunk + 2)
        packed = results[str(index)]
        statuses.append(solo.status)
        assert packed.summary["device"] == solo.summary["device"] == str(device)
        assert_same(packed, solo)
        assert len(kept[str(index)]) == len(solo_kept)
        for mine, theirs in zip(kept[str(index)], solo_kept, strict=True):
            mine_leaves, their_leaves = leaves(without_timing(mine)), leaves(without_timing(theirs))
            assert [(path, type(v)) for path, v in mine_leaves] == [
                (path, type(v)) for path, v in their_leaves
            ]
            numbers = [(a, b) for (_, a), (_, b) in zip(mine_leaves, their_leaves, strict=True)]
            assert [a for a, b in numbers if not isinstance(a, float)] == [
                b for a, b in numbers if not isinstance(a, float)
            ]
            floats = [(a, b) for a, b in numbers if isinstance(a, float)]
            assert_close([a for a, _ in floats], [b for _, b in floats], REL)
    return statuses


def leaves(value: Any, path: str = "") -> list[tuple[str, Any]]:
    """A checkpoint's scalars with where they sit, in order."""
    if isinstance(value, dict):
        return [leaf for key in sorted(value) for leaf in leaves(value[key], f"{path}.{key}")]
    if isinstance(value, list):
        return [leaf for i, item in enumerate(value) for leaf in leaves(item, f"{path}[{i}]")]
    return [(path, value)]


@settings(max_examples=60, deadline=None)
@given(packs(), st.integers(1, 7))
def test_a_pack_on_a_torch_device_equals_its_members_solo_runs_there(
    pack: tuple[TrainData, list[JobSpec], list[int | None]], chunk: int
) -> None:
    """The CUDA pack's code (stacked maps, one batched scan per batch group), on the cpu."""
    for status in device_pack_equals_solo_runs(pack, chunk, torch.device("cpu")):
        event(status)


def test_a_device_pack_stacks_members_with_and_without_momentum_and_splits_big_stacks(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from workers.engines import pack_torch

    rng = np.random.default_rng(11)
    data = make_data(rng, 300, 3, n_test=40)
    base = make_spec(data, epochs=6, batch_size=16, loss={"reduction": "mean"})
    specs = [
        base.model_copy(
            update={"optimizer": base.optimizer.model_copy(update={"lr": lr, "momentum": mu})}
        )
        for lr in (0.01, 0.02, 0.05)
        for mu in (0.0, 0.5)
    ]
    stacks: list[int] = []
    real = pack_torch.stacked_epoch

    def counted(maps: torch.Tensor, *args: Any) -> Any:
        stacks.append(maps.shape[0])
        return real(maps, *args)

    monkeypatch.setattr(pack_torch, "stacked_epoch", counted)
    cpu = torch.device("cpu")
    assert device_pack_equals_solo_runs((data, specs, [None] * 6), 4, cpu) == ["succeeded"] * 6
    # One stack with momentum and one without, an epoch each: 6 epochs in two lanes.
    assert stacks == [3, 3] * 6
    stacks.clear()
    # A stack bound below one member's maps: every member becomes a stack of its own.
    monkeypatch.setattr(pack_torch, "STACK_BYTES", 1)
    cancels: list[int | None] = [None, 3] * 3
    statuses = device_pack_equals_solo_runs((data, specs, cancels), 4, cpu)
    assert statuses == ["succeeded", "cancelled"] * 3
    assert set(stacks) == {1}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@settings(max_examples=20, deadline=None)
@given(packs(), st.integers(1, 7))
def test_a_pack_on_cuda_equals_its_members_solo_runs_there(
    pack: tuple[TrainData, list[JobSpec], list[int | None]], chunk: int
) -> None:
    device_pack_equals_solo_runs(pack, chunk, torch.device("cuda"))
