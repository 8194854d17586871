"""The fused engine against the reference loop: same data, start and permutations, every option."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import event, given, settings
from hypothesis import strategies as st

from service.errors import SpecError
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
from workers.engines.base import Checkpoint, RunResult, TrainData, optimum
from workers.engines.epochs import run_epochs
from workers.engines.fused import ANCHOR_EPOCHS, fit_statistics
from workers.engines.fused_torch import TorchFusedEngine
from workers.engines.registry import Choice, choose

ROOT = Path(__file__).parents[2]


def run_both(spec: JobSpec, data: TrainData) -> tuple[RunResult, RunResult, Checkpoint, Checkpoint]:
    """The spec on the loop and on the fused engine, with each one's last checkpoint."""
    out: list[Any] = []
    kept: list[list[Checkpoint]] = [[], []]
    for engine, snapshots in zip(("loop", "fused"), kept, strict=True):
        forced = spec.model_copy(update={"engine": engine})
        out.append(train(forced, data, on_epoch=keep_snapshots(snapshots)))
    return out[0], out[1], (kept[0] or [{}])[-1], (kept[1] or [{}])[-1]


def assert_same_run(loop: RunResult, fused: RunResult, rel: float) -> None:
    assert (loop.summary["engine"], fused.summary["engine"]) == ("loop", "fused")
    assert fused.status == loop.status
    assert fused.summary.get("diverged_at") == loop.summary.get("diverged_at")
    assert [r.epoch for r in fused.history] == [r.epoch for r in loop.history]
    assert_close(fused.losses, loop.losses, rel)
    loop_tests = [r.test_loss for r in loop.history]
    fused_tests = [r.test_loss for r in fused.history]
    assert [t is None for t in fused_tests] == [t is None for t in loop_tests]
    assert_close(
        [t for t in fused_tests if t is not None], [t for t in loop_tests if t is not None], rel
    )
    assert_close(final_params(fused), final_params(loop), rel)
    assert fused.summary["epochs_done"] == loop.summary["epochs_done"]
    for key in ("final_loss", "test_loss", "r2", "test_r2"):
        if loop.summary[key] is None:
            assert fused.summary[key] is None, key
        else:
            assert fused.summary[key] == pytest.approx(loop.summary[key], rel=rel, abs=1e-12), key


@st.composite
def fused_runs(draw: st.DrawFn) -> tuple[JobSpec, TrainData]:
    """A random run (every SGD option), on either backend, sometimes stepped until it diverges."""
    spec, data = draw(random_runs())
    update: dict[str, Any] = {"backend": draw(st.sampled_from(["torch", "numpy"]))}
    if draw(st.integers(0, 3)) == 0:
        # A step well past the stability limit: both engines must go non-finite together.
        factor = draw(st.floats(400, 5000))
        optimizer = spec.optimizer.model_copy(update={"lr": spec.optimizer.lr * factor})
        update.update(optimizer=optimizer, epochs=draw(st.integers(40, 120)))
    elif draw(st.booleans()):
        update["epochs"] = draw(st.integers(ANCHOR_EPOCHS - 2, 3 * ANCHOR_EPOCHS))
    return spec.model_copy(update=update), data


@settings(max_examples=300, deadline=None)
@given(fused_runs())
def test_fused_matches_the_loop(run: tuple[JobSpec, TrainData]) -> None:
    spec, data = run
    loop, fused, loop_last, fused_last = run_both(spec, data)
    event(f"{loop.status}, {'full batch' if spec.batch_size in (None, len(data.y)) else 'mini'}")
    assert_same_run(loop, fused, 1e-9)
    if loop.history:
        # Momentum buffers in the checkpoints agree as well. They are gradients, which tend to
        # zero by cancellation, so their rounding is measured against the parameters' scale.
        assert (loop_last["momentum"] is None) == (fused_last["momentum"] is None)
        if loop_last["momentum"] is not None and loop.status == "succeeded":
            scale = 1e-9 * max(1.0, *np.abs(final_params(loop)))
            np.testing.assert_allclose(
                fused_last["momentum"]["weights"],
                loop_last["momentum"]["weights"],
                rtol=1e-9,
                atol=scale,
            )


def train_on_torch(spec: JobSpec, data: TrainData, device: str, chunk_epochs: int) -> RunResult:
    """The spec on the fused engine's torch code, on ``device``."""
    engine = TorchFusedEngine(spec, data, device=torch.device(device))
    return run_epochs(
        spec,
        data,
        engine,
        on_epoch=None,
        should_stop=None,
        resume=None,
        chunk_epochs=chunk_epochs,
        chunk_seconds=60.0,
    )


@settings(max_examples=60, deadline=None)
@given(fused_runs(), st.integers(1, 20))
def test_fused_torch_code_matches_the_loop(run: tuple[JobSpec, TrainData], chunk: int) -> None:
    """The CUDA code path, run on the cpu: statistics, batch maps and their pairwise scan."""
    spec, data = run
    loop = train(spec.model_copy(update={"engine": "loop"}), data)
    fused = train_on_torch(spec, data, "cpu", chunk)
    assert fused.summary["device"] == "cpu"
    assert_same_run(loop, fused, 1e-9)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("batch_size", [None, 1, 32, 1000])
def test_fused_on_cuda_matches_the_cpu_loop(batch_size: int | None) -> None:
    rng = np.random.default_rng()
    data = make_data(rng, 5000, 4, n_test=100)
    spec = make_spec(
        data,
        epochs=8,
        batch_size=batch_size,
        loss={"reduction": "mean"},
        optimizer={"lr": 1e-2, "momentum": 0.9, "nesterov": True, "weight_decay": 1e-3},
        seed=int(rng.integers(2**32)),
        eval_every=2,
    )
    loop = train(spec.model_copy(update={"engine": "loop"}), data)
    cuda = train(spec.model_copy(update={"device": "cuda", "engine": "fused"}), data)
    assert cuda.summary["device"].startswith("cuda")
    assert_same_run(loop, cuda, 1e-9)


@pytest.mark.parametrize("batch_size", [None, 7])
def test_divergence_at_the_same_epoch_keeps_the_history_before(batch_size: int | None) -> None:
    data = make_data(np.random.default_rng(), 50, 3, n_test=5)
    spec = make_spec(
        data, optimizer={"lr": 10.0, "momentum": 0.5}, epochs=1000, batch_size=batch_size
    )
    loop, fused, _, fused_last = run_both(spec, data)
    assert fused.status == loop.status == "diverged"
    assert_same_run(loop, fused, 1e-9)
    assert fused.summary["diverged_at"] == len(fused.history) + 1
    assert fused.summary["weights"] == fused_last["weights"]
    json.dumps(fused.summary, allow_nan=False)


@pytest.mark.parametrize("batch_size", [None, 9])
@pytest.mark.parametrize("backend", ["torch", "numpy"])
def test_float32_fused_is_as_close_to_float64_as_the_float32_loop(
    batch_size: int | None, backend: str
) -> None:
    rng = np.random.default_rng()
    data = make_data(rng, 300, 3, n_test=30, noise=1e-3)
    fields: dict[str, Any] = {
        "backend": backend,
        "epochs": 150,
        "batch_size": batch_size,
        "loss": {"reduction": "mean"},
        "optimizer": {"lr": 0.02, "momentum": 0.9},
        "seed": int(rng.integers(2**32)),
    }
    reference = train(make_spec(data, dtype="float64", engine="loop", **fields), data)
    loop32 = train(make_spec(data, dtype="float32", engine="loop", **fields), data)
    fused32 = train(make_spec(data, dtype="float32", engine="fused", **fields), data)
    expected = np.asarray(reference.losses)

    def error(result: RunResult) -> tuple[float, float]:
        losses = np.max(np.abs(np.asarray(result.losses) - expected) / expected)
        params = np.asarray(final_params(result)) - np.asarray(final_params(reference))
        return float(losses), float(np.max(np.abs(params)))

    fused_error, loop_error = error(fused32), error(loop32)
    assert fused_error[0] <= loop_error[0]
    assert fused_error[1] <= loop_error[1]


@pytest.mark.parametrize("batch_size", [None, 6])
def test_resume_from_a_fused_checkpoint_is_bit_for_bit(batch_size: int | None) -> None:
    rng = np.random.default_rng()
    data = make_data(rng, 40, 3, n_test=6)
    epochs = 3 * ANCHOR_EPOCHS + 5
    spec = make_spec(
        data,
        engine="fused",
        epochs=epochs,
        batch_size=batch_size,
        loss={"reduction": "mean"},
        optimizer={"lr": 1e-3, "momentum": 0.9, "weight_decay": 1e-3, "nesterov": True},
        seed=int(rng.integers(2**32)),
        eval_every=4,
    )
    whole_snapshots: list[Checkpoint] = []
    whole = train(spec, data, on_epoch=keep_snapshots(whole_snapshots), chunk_epochs=17)
    stops = sorted({1, ANCHOR_EPOCHS, ANCHOR_EPOCHS + 1, int(rng.integers(2, epochs))})
    for stop_at in stops:
        saved: list[Checkpoint] = []
        first = train(
            spec,
            data,
            on_epoch=keep_snapshots(saved),
            should_stop=stop_after(stop_at),
            chunk_epochs=int(rng.integers(1, 80)),
        )
        assert first.status == "cancelled"
        checkpoint = json.loads(json.dumps(saved[-1], allow_nan=False))
        expected = {k: v for k, v in whole_snapshots[stop_at - 1].items() if k != "train_seconds"}
        assert {k: v for k, v in checkpoint.items() if k != "train_seconds"} == expected
        rest = train(spec, data, resume=checkpoint, chunk_epochs=int(rng.integers(1, 80)))
        records = first.history + rest.history
        assert [(r.epoch, r.train_loss, r.test_loss) for r in records] == [
            (r.epoch, r.train_loss, r.test_loss) for r in whole.history
        ]
        assert (rest.summary["weights"], rest.summary["bias"]) == (
            whole.summary["weights"],
            whole.summary["bias"],
        )


def test_fused_resumes_a_loop_checkpoint() -> None:
    """A checkpoint in the earlier schema (no anchor, written by the loop) resumes on fused."""
    data = make_data(np.random.default_rng(), 30, 2)
    spec = make_spec(data, epochs=40, optimizer={"lr": 1e-3, "momentum": 0.8})
    saved: list[Checkpoint] = []
    loop_spec = spec.model_copy(update={"engine": "loop"})
    whole = train(loop_spec, data)
    train(loop_spec, data, on_epoch=keep_snapshots(saved), should_stop=stop_after(13))
    assert "anchor" not in saved[-1]
    rest = train(spec.model_copy(update={"engine": "fused"}), data, resume=saved[-1])
    assert rest.summary["engine"] == "fused"
    assert [r.epoch for r in rest.history] == list(range(14, 41))
    assert_close(rest.losses, whole.losses[13:], 1e-9)
    assert_close(final_params(rest), final_params(whole), 1e-9)


@pytest.mark.parametrize("fit_intercept", [True, False])
def test_statistics_and_optimum_match_lstsq(fit_intercept: bool) -> None:
    rng = np.random.default_rng()
    n = int(rng.integers(20_000, 40_000))
    x = rng.normal(size=(n, 4)) * rng.uniform(0.5, 3, size=4) + rng.normal(size=4)
    y = x @ rng.normal(size=4) + 2.0 + 1e-6 * rng.normal(size=n)
    stats = fit_statistics(x, y, fit_intercept)
    rows = np.c_[np.ones(n), x] if fit_intercept else x
    np.testing.assert_allclose(stats.gram, rows.T @ rows, rtol=1e-12)
    weights, bias = optimum(x, y, fit_intercept)
    best = stats.optimum()
    np.testing.assert_allclose(best.weights, weights, rtol=1e-9, atol=1e-12)
    if fit_intercept:
        assert best.bias == pytest.approx(bias, rel=1e-9)
    residual = rows @ np.r_[([bias] if fit_intercept else []), weights] - y
    assert best.rss == pytest.approx(float(residual @ residual), rel=1e-6)
    # The loss at any point, from the statistics, against the direct sum.
    point = rng.normal(size=rows.shape[1])
    direct = float(np.sum((rows @ point - y) ** 2))
    from_stats = float(stats.sse((point - stats.shift).reshape(1, -1))[0])
    assert from_stats == pytest.approx(direct, rel=1e-12)


def test_tiny_noise_loss_keeps_its_digits() -> None:
    """At the tutorial's 1e-6 noise the full-batch loss near the optimum is still exact."""
    rng = np.random.default_rng()
    n = 5000
    x = rng.normal(size=(n, 3))
    y = x @ [1.0, 2.0, 4.0] + 3 + 1e-6 * rng.normal(size=n)
    data = TrainData(x, y)
    stats = fit_statistics(x, y, True)
    best = stats.optimum()
    near = np.r_[best.bias, best.weights] + 1e-7 * rng.normal(size=4)
    rows = np.c_[np.ones(n), x]
    # The reference: the residual in exact rational steps is out of reach, so long double.
    exact = np.sum((rows.astype(np.longdouble) @ near.astype(np.longdouble) - y) ** 2)
    fused = float(stats.sse((near - stats.shift).reshape(1, -1))[0])
    assert fused == pytest.approx(float(exact), rel=1e-7)
    assert data.n_features == 3


def test_registry_says_which_and_why() -> None:
    data = make_data(np.random.default_rng(), 20, 2)
    spec = make_spec(data)
    assert choose(spec, cuda=False) == Choice("fused", "cpu", "auto: compiled kernels on the cpu")
    assert choose(spec.model_copy(update={"engine": "loop"}), cuda=False).engine == "loop"
    on_gpu = choose(spec.model_copy(update={"device": "auto"}), cuda=True)
    assert (on_gpu.engine, on_gpu.place) == ("fused", "device") and "cuda" in on_gpu.reason
    without_numba = choose(spec, cuda=False, compiled=False)
    assert without_numba.engine == "loop" and "numba" in without_numba.reason
    with pytest.raises(SpecError, match=r"^engine: fused cannot run"):
        choose(spec.model_copy(update={"engine": "fused"}), cuda=False, compiled=False)
    assert train(spec, data).summary["engine"] == "fused"
    assert train(spec.model_copy(update={"engine": "loop"}), data).summary["engine"] == "loop"


def test_engine_field_is_validated() -> None:
    data = make_data(np.random.default_rng(), 20, 2)
    with pytest.raises(ValueError, match="engine"):
        make_spec(data, engine="fast")
    assert make_spec(data).engine == "auto"


THREADS_SCRIPT = """
import json, sys
import numba, numpy as np, torch
threads = int(sys.argv[1])
torch.set_num_threads(threads)
numba.set_num_threads(threads)
from service.spec import JobSpec
from workers.engines import train
from workers.engines.base import TrainData
rng = np.random.default_rng(3)
x = rng.normal(size=(200_000, 3))
y = x @ [1.0, 2.0, 4.0] + 3 + 1e-3 * rng.normal(size=200_000)
out = []
for batch_size in (None, 4096):
    spec = JobSpec.model_validate({
        "data": {"synthetic": {"n_samples": 200_000, "n_features": 3}},
        "backend": "torch", "dtype": "float64", "epochs": 30, "batch_size": batch_size,
        "loss": {"reduction": "mean"}, "optimizer": {"lr": 0.05, "momentum": 0.5},
    })
    result = train(spec, TrainData(x, y))
    out.append([result.summary["engine"], result.losses, result.summary["weights"],
                result.summary["bias"], result.summary["optimum_weights"]])
print(json.dumps(out))
"""


def test_default_engine_numbers_do_not_depend_on_the_thread_count() -> None:
    runs = [
        subprocess.run(
            [sys.executable, "-c", THREADS_SCRIPT, str(threads)],
            check=True,
            capture_output=True,
            text=True,
            cwd=ROOT,
        ).stdout
        for threads in (1, 2)
    ]
    one, two = (json.loads(out) for out in runs)
    assert [run[0] for run in one] == ["fused", "fused"]
    assert one == two


@pytest.mark.parametrize("epochs", [42, 43])
@pytest.mark.parametrize("chunk", [1, 5, 20])
def test_fused_torch_code_diverges_at_the_loops_epoch_near_overflow(
    epochs: int, chunk: int
) -> None:
    """One-row batches stepped past stability: the epoch losses climb to about 1e305, where the
    expanded quadratic form overflows an epoch before the loop's sums of squares do."""
    spec = JobSpec.model_validate(
        {
            "data": {"synthetic": {"n_samples": 2, "n_features": 1, "seed": 0}},
            "backend": "torch",
            "model": {"fit_intercept": True, "init": "zeros"},
            "optimizer": {"lr": 64.93219917042357, "weight_decay": 0.0546875},
            "epochs": epochs,
            "batch_size": 1,
            "shuffle": False,
            "dtype": "float64",
        }
    )
    data = TrainData(
        x=np.array([[-1.19684572], [0.43906364]]), y=np.array([-5.24251455, 0.75500231])
    )
    loop = train(spec.model_copy(update={"engine": "loop"}), data)
    assert loop.status == ("succeeded" if epochs == 42 else "diverged")
    assert_same_run(loop, train_on_torch(spec, data, "cpu", chunk), 1e-9)
