"""The engines against the tutorial's own programs, against each other, and across resumes."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from service.errors import DeviceError, StateError
from service.spec import JobSpec
from workers.engines import cuda_available, train
from workers.engines.base import (
    Checkpoint,
    EpochRecord,
    OnEpoch,
    RunResult,
    ShouldStop,
    TrainData,
)

BACKENDS = ["torch", "numpy"]
TOLERANCE = {"float64": 1e-10, "float32": 1e-5}


def make_data(
    rng: np.random.Generator, n: int, d: int, *, noise: float = 0.5, n_test: int = 0
) -> TrainData:
    weights = rng.normal(0, 2, size=d)
    bias = float(rng.normal(0, 2))
    x = rng.normal(size=(n, d))
    y = x @ weights + bias + noise * rng.normal(size=n)
    x_test = y_test = None
    if n_test:
        x_test = rng.normal(size=(n_test, d))
        y_test = x_test @ weights + bias + noise * rng.normal(size=n_test)
    return TrainData(x, y, x_test, y_test, weights, bias)


def make_spec(data: TrainData, **fields: Any) -> JobSpec:
    n, d = data.x.shape
    document: dict[str, Any] = {
        "data": {"synthetic": {"n_samples": n, "n_features": d}},
        "dtype": "float64",
    }
    document.update(fields)
    return JobSpec.model_validate(document)


def assert_close(actual: Any, expected: Any, rel: float) -> None:
    actual, expected = np.asarray(actual, dtype=float), np.asarray(expected, dtype=float)
    scale = float(np.max(np.abs(expected), initial=0.0))
    np.testing.assert_allclose(actual, expected, rtol=rel, atol=rel * scale)


def keep_snapshots(kept: list[Checkpoint]) -> OnEpoch:
    """An on_epoch that appends each epoch's checkpoint to ``kept``."""

    def on_epoch(_record: EpochRecord, snapshot: Callable[[], Checkpoint]) -> None:
        kept.append(snapshot())

    return on_epoch


def stop_after(calls: int) -> ShouldStop:
    """A should_stop that answers True from its ``calls``-th call on."""
    asked: list[None] = []

    def should_stop() -> bool:
        asked.append(None)
        return len(asked) >= calls

    return should_stop


def final_params(result: RunResult) -> list[float]:
    bias = result.summary["bias"]
    return [*([] if bias is None else [bias]), *result.summary["weights"]]


# -- the tutorial's programs ----------------------------------------------------------------


def tutorial_torch(
    x: np.ndarray, y: np.ndarray, epochs: int, batch_size: int | None, dtype: torch.dtype
) -> tuple[list[float], list[float], list[float]]:
    """The tutorial's PyTorch loop (mini-batches in order when batch_size is given)."""
    X = torch.tensor(x, dtype=dtype)
    Y = torch.tensor(y, dtype=dtype).reshape(-1, 1)
    model = nn.Linear(3, 1).to(dtype)
    start = [model.bias.item(), *model.weight.detach().reshape(-1).tolist()]
    criterion = nn.MSELoss(reduction="sum")
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-4)
    losses = []
    if batch_size is None:
        for _epoch in range(epochs):
            y_pred = model(X)
            loss = criterion(y_pred, Y)
            losses.append(loss.item())
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    else:
        for _epoch in range(epochs):
            epoch_loss = 0.0
            for i in range(0, len(X), batch_size):
                y_pred = model(X[i : i + batch_size])
                loss = criterion(y_pred, Y[i : i + batch_size])
                epoch_loss += loss.item()
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
            losses.append(epoch_loss)
    final = [model.bias.item(), *model.weight.detach().reshape(-1).tolist()]
    return losses, start, final


def tutorial_numpy(
    x: np.ndarray, y: np.ndarray, epochs: int, batch_size: int | None, dtype: type[np.floating]
) -> tuple[list[float], list[float]]:
    """The tutorial's NumPy gradient descent (mini-batches in order when batch_size is given)."""
    X = np.c_[np.ones(len(x)), x].astype(dtype)
    y = y.astype(dtype)
    p = np.zeros(X.shape[1], dtype=dtype)
    lr = 1e-4
    losses = []
    if batch_size is None:
        n = len(X)
        for _epoch in range(epochs):
            e = X @ p - y
            losses.append(float(np.mean(e**2)))
            grad = (2 / n) * X.T @ e
            p = p - lr * grad
    else:
        for _epoch in range(epochs):
            squared = 0.0
            for i in range(0, len(X), batch_size):
                Xb, yb = X[i : i + batch_size], y[i : i + batch_size]
                e = Xb @ p - yb
                squared += float(np.sum(e**2))
                grad = (2 / len(yb)) * Xb.T @ e
                p = p - lr * grad
            losses.append(squared / len(X))
    return losses, p.tolist()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("mini_batch", [False, True], ids=["full", "mini"])
def test_engines_reproduce_the_tutorial_torch_loop(
    backend: str, dtype: str, mini_batch: bool
) -> None:
    rng = np.random.default_rng()
    data = make_data(rng, 1000, 3)
    batch_size = int(rng.integers(30, 300)) if mini_batch else None
    epochs = 30
    losses, start, final = tutorial_torch(data.x, data.y, epochs, batch_size, getattr(torch, dtype))
    spec = make_spec(
        data,
        backend=backend,
        dtype=dtype,
        model={"init": {"weights": start[1:], "bias": start[0]}},
        loss={"reduction": "sum"},
        optimizer={"lr": 1e-4},
        epochs=epochs,
        batch_size=batch_size,
        shuffle=False,
    )
    result = train(spec, data)
    assert result.status == "succeeded"
    assert_close(result.losses, losses, TOLERANCE[dtype])
    assert_close(final_params(result), final, TOLERANCE[dtype])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("mini_batch", [False, True], ids=["full", "mini"])
def test_engines_reproduce_the_tutorial_numpy_loop(
    backend: str, dtype: str, mini_batch: bool
) -> None:
    rng = np.random.default_rng()
    data = make_data(rng, 100, 3)
    batch_size = int(rng.integers(5, 40)) if mini_batch else None
    epochs = 1000 if not mini_batch else 200
    losses, final = tutorial_numpy(data.x, data.y, epochs, batch_size, getattr(np, dtype))
    spec = make_spec(
        data,
        backend=backend,
        dtype=dtype,
        model={"init": "zeros"},
        loss={"reduction": "mean"},
        optimizer={"lr": 1e-4},
        epochs=epochs,
        batch_size=batch_size,
        shuffle=False,
    )
    result = train(spec, data)
    assert_close(result.losses, losses, TOLERANCE[dtype])
    assert_close(final_params(result), final, TOLERANCE[dtype])


def test_tutorial_numbers() -> None:
    """The tutorial's torch run: loss from about 3e4 to below 1e-6 within 100 epochs."""
    generator = torch.Generator().manual_seed(int(np.random.default_rng().integers(2**32)))
    x = torch.normal(0.0, 1.0, size=(1000, 3), generator=generator)
    noise = torch.normal(0.0, 1.0, size=(1000,), generator=generator) * 1e-6
    y = x @ torch.tensor([1.0, 2.0, 4.0]) + 3 + noise
    data = TrainData(x.double().numpy(), y.double().numpy())
    spec = JobSpec.model_validate(
        {
            "data": {
                "synthetic": {
                    "n_samples": 1000,
                    "coefficients": [1, 2, 4],
                    "intercept": 3,
                    "noise_std": 1e-6,
                    "generator": "torch",
                }
            },
            "loss": {"reduction": "sum"},
            "optimizer": {"lr": 1e-4},
            "epochs": 100,
        }
    )
    assert (spec.backend, spec.dtype, spec.batch_size) == ("torch", "float32", None)
    result = train(spec, data)
    assert 1e4 < result.losses[0] < 1e5
    assert result.losses[-1] < 1e-6
    assert_close(result.summary["weights"], [1, 2, 4], 1e-3)
    assert result.summary["bias"] == pytest.approx(3, abs=1e-3)


# -- the two backends agree -----------------------------------------------------------------


@st.composite
def random_runs(draw: st.DrawFn) -> tuple[JobSpec, TrainData]:
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    n, d = draw(st.integers(2, 40)), draw(st.integers(1, 4))
    data = make_data(rng, n, d, noise=draw(st.floats(0.1, 1.0)), n_test=draw(st.integers(0, 5)))
    fit_intercept = draw(st.booleans())
    reduction = draw(st.sampled_from(["sum", "mean"]))
    momentum = draw(st.sampled_from([0.0]) | st.floats(0.1, 0.9))
    nesterov = momentum > 0 and draw(st.booleans())
    dampening = 0.0 if nesterov else draw(st.sampled_from([0.0]) | st.floats(0.0, 0.5))
    weight_decay = draw(st.sampled_from([0.0]) | st.floats(1e-4, 0.1))
    # A step well inside every batch's stability limit, so the runs stay finite.
    rows = np.c_[np.ones(n), data.x] if fit_intercept else data.x
    curvature = 2 * (np.sum(rows**2) if reduction == "sum" else np.max(np.sum(rows**2, axis=1)))
    lr = draw(st.floats(0.01, 0.3)) / (curvature + weight_decay)
    init: Any = "zeros"
    if draw(st.booleans()):
        init = {"weights": rng.normal(size=d).tolist()}
        init["bias"] = float(rng.normal()) if fit_intercept else None
    spec = make_spec(
        data,
        model={"fit_intercept": fit_intercept, "init": init},
        loss={"reduction": reduction},
        optimizer={
            "lr": lr,
            "momentum": momentum,
            "dampening": dampening,
            "weight_decay": weight_decay,
            "nesterov": nesterov,
        },
        epochs=draw(st.integers(1, 15)),
        batch_size=draw(st.none() | st.integers(1, n)),
        shuffle=draw(st.booleans()),
        seed=draw(st.integers(0, 2**32 - 1)),
        eval_every=draw(st.integers(1, 3)),
    )
    return spec, data


@settings(max_examples=40, deadline=None)
@given(random_runs())
def test_torch_and_numpy_agree(run: tuple[JobSpec, TrainData]) -> None:
    spec, data = run
    results, snapshots = [], []
    for backend in BACKENDS:
        kept: list[Checkpoint] = []
        results.append(
            train(
                spec.model_copy(update={"backend": backend}),
                data,
                on_epoch=keep_snapshots(kept),
            )
        )
        snapshots.append(kept[-1])
    torch_run, numpy_run = results
    assert torch_run.status == numpy_run.status == "succeeded"
    assert [r.epoch for r in torch_run.history] == [r.epoch for r in numpy_run.history]
    assert_close(torch_run.losses, numpy_run.losses, 1e-9)
    assert_close(final_params(torch_run), final_params(numpy_run), 1e-9)
    test_losses = [[r.test_loss for r in run.history] for run in results]
    assert [t is None for t in test_losses[0]] == [t is None for t in test_losses[1]]
    assert_close(
        [t for t in test_losses[0] if t is not None],
        [t for t in test_losses[1] if t is not None],
        1e-9,
    )
    torch_momentum, numpy_momentum = (s["momentum"] for s in snapshots)
    assert (torch_momentum is None) == (numpy_momentum is None) == (spec.optimizer.momentum == 0)
    if torch_momentum is not None:
        assert_close(torch_momentum["weights"], numpy_momentum["weights"], 1e-9)
        assert (torch_momentum["bias"] is None) == (numpy_momentum["bias"] is None)
        if torch_momentum["bias"] is not None:
            assert torch_momentum["bias"] == pytest.approx(
                numpy_momentum["bias"], rel=1e-9, abs=1e-12
            )


# -- convergence ----------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
def test_converged_run_matches_lstsq(backend: str) -> None:
    rng = np.random.default_rng()
    data = make_data(rng, 200, 3)
    rows = np.c_[np.ones(200), data.x]
    lr = 0.5 / (2 * np.linalg.eigvalsh(rows.T @ rows / 200).max())

    def run(epochs: int, step: float) -> RunResult:
        spec = make_spec(
            data, backend=backend, loss={"reduction": "mean"}, optimizer={"lr": step}, epochs=epochs
        )
        return train(spec, data)

    converged = run(500, lr).summary
    assert_close(converged["weights"], converged["optimum_weights"], 1e-6)
    assert converged["bias"] == pytest.approx(converged["optimum_bias"], abs=1e-6)
    slow = lr / 50
    gaps = [run(epochs, slow).summary["optimum_gap"] for epochs in (5, 50, 500)]
    assert gaps[0] > gaps[1] > 0
    assert gaps[1] >= gaps[2] >= 0


# -- resume ---------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_resume_continues_bit_for_bit(backend: str, dtype: str) -> None:
    rng = np.random.default_rng()
    data = make_data(rng, 60, 3, n_test=10)
    epochs = 12
    spec = make_spec(
        data,
        backend=backend,
        dtype=dtype,
        loss={"reduction": str(rng.choice(["sum", "mean"]))},
        optimizer={"lr": 1e-3, "momentum": 0.9, "weight_decay": 0.01, "nesterov": True},
        epochs=epochs,
        batch_size=7,
        shuffle=True,
        seed=int(rng.integers(2**32)),
        eval_every=2,
    )
    whole_snapshots: list[Checkpoint] = []
    whole = train(spec, data, on_epoch=keep_snapshots(whole_snapshots))

    stop_at = int(rng.integers(1, epochs))
    saved: list[Checkpoint] = []
    first = train(spec, data, on_epoch=keep_snapshots(saved), should_stop=stop_after(stop_at))
    assert first.status == "cancelled"
    checkpoint = json.loads(json.dumps(saved[-1], allow_nan=False))
    assert checkpoint["epoch"] == stop_at
    assert checkpoint["shuffle"] == {"seed": spec.seed, "next_epoch": stop_at + 1}
    expected = {k: v for k, v in whole_snapshots[stop_at - 1].items() if k != "train_seconds"}
    assert {k: v for k, v in checkpoint.items() if k != "train_seconds"} == expected

    rest = train(spec, data, resume=checkpoint)
    assert rest.status == "succeeded"
    records = first.history + rest.history
    assert [r.epoch for r in records] == list(range(1, epochs + 1))
    assert [(r.train_loss, r.test_loss) for r in records] == [
        (r.train_loss, r.test_loss) for r in whole.history
    ]
    for key in ("weights", "bias", "best_loss", "initial_weights", "initial_bias", "epochs_done"):
        assert rest.summary[key] == whole.summary[key], key


def test_resume_refuses_a_checkpoint_for_another_run() -> None:
    data = make_data(np.random.default_rng(), 20, 2)
    spec = make_spec(data, epochs=3, optimizer={"momentum": 0.5}, seed=1)
    saved: list[Checkpoint] = []
    train(spec, data, on_epoch=keep_snapshots(saved))
    with pytest.raises(StateError, match="seed"):
        train(spec.model_copy(update={"seed": 2}), data, resume=saved[0])
    with pytest.raises(StateError, match="weights"):
        train(spec, data, resume={**saved[0], "weights": [1.0]})


def test_resume_after_the_last_epoch_runs_nothing() -> None:
    data = make_data(np.random.default_rng(), 20, 2)
    spec = make_spec(data, backend="numpy", epochs=3)
    saved: list[Checkpoint] = []
    done = train(spec, data, on_epoch=keep_snapshots(saved))
    again = train(spec, data, resume=saved[-1])
    assert again.status == "succeeded" and again.history == []
    assert again.summary["weights"] == done.summary["weights"]
    assert again.summary["epochs_done"] == 3


# -- stopping -------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_divergence_keeps_the_finite_epochs(backend: str, dtype: str) -> None:
    data = make_data(np.random.default_rng(), 50, 3, n_test=5)
    snapshots: list[Checkpoint] = []
    spec = make_spec(data, backend=backend, dtype=dtype, optimizer={"lr": 10.0}, epochs=1000)
    result = train(spec, data, on_epoch=keep_snapshots(snapshots))
    assert result.status == "diverged"
    assert 0 < len(result.history) < 1000
    assert all(np.isfinite(result.losses))
    assert result.summary["diverged_at"] == len(result.history) + 1
    assert result.summary["epochs_done"] == len(result.history)
    json.dumps(result.summary, allow_nan=False)
    # The result holds the parameters of the last kept epoch, as its checkpoint does.
    assert result.summary["weights"] == snapshots[-1]["weights"]


@pytest.mark.parametrize("backend", BACKENDS)
def test_should_stop_cancels(backend: str) -> None:
    data = make_data(np.random.default_rng(), 30, 2)
    spec = make_spec(data, backend=backend, epochs=20)
    result = train(spec, data, should_stop=stop_after(3))
    assert result.status == "cancelled"
    assert [r.epoch for r in result.history] == [1, 2, 3]
    assert result.summary["epochs_done"] == 3
    # A stop request after the last epoch is too late to cancel anything.
    assert train(spec.model_copy(update={"epochs": 1}), data, should_stop=lambda: True).status == (
        "succeeded"
    )


@pytest.mark.parametrize("backend", BACKENDS)
def test_eval_every(backend: str) -> None:
    data = make_data(np.random.default_rng(), 30, 2, n_test=8)
    spec = make_spec(data, backend=backend, epochs=7, eval_every=3)
    result = train(spec, data)
    assert [r.epoch for r in result.history if r.test_loss is not None] == [3, 6, 7]
    assert result.history[-1].test_loss == pytest.approx(result.summary["test_loss"], rel=1e-12)


def test_summary_and_checkpoint_are_json_safe() -> None:
    data = make_data(np.random.default_rng(), 30, 2, n_test=4)
    spec = make_spec(data, epochs=3, batch_size=4, optimizer={"momentum": 0.5})
    saved: list[Checkpoint] = []
    result = train(spec, data, on_epoch=keep_snapshots(saved))
    json.dumps([result.summary, saved], allow_nan=False)
    assert set(saved[0]) == {
        "backend",
        "epoch",
        "weights",
        "bias",
        "momentum",
        "shuffle",
        "initial_weights",
        "initial_bias",
        "best_loss",
        "train_seconds",
    }
    assert result.summary["best_loss"] == min(result.losses)
    assert result.summary["train_loss"] == result.losses[-1]
    assert (result.summary["backend"], result.summary["dtype"]) == ("torch", "float64")
    assert result.summary["device"] == "cpu"


# -- initialization and devices -------------------------------------------------------------


def test_default_init_is_seeded_and_leaves_the_global_rng_alone() -> None:
    data = make_data(np.random.default_rng(), 20, 3)
    seed = int(np.random.default_rng().integers(2**32))
    spec = make_spec(data, backend="torch", dtype="float32", epochs=1, seed=seed)
    before = torch.random.get_rng_state()
    result = train(spec, data)
    assert torch.equal(before, torch.random.get_rng_state())
    torch.manual_seed(seed)
    reference = nn.Linear(3, 1)
    assert result.summary["initial_weights"] == reference.weight.reshape(-1).tolist()
    assert result.summary["initial_bias"] == reference.bias.item()
    for d, intercept in [(1, True), (7, True), (4, False)]:
        wide = make_data(np.random.default_rng(), 10, d)
        spec_d = make_spec(
            wide, backend="torch", epochs=1, seed=seed + d, model={"fit_intercept": intercept}
        )
        torch.manual_seed(seed + d)
        reference = nn.Linear(d, 1, bias=intercept)
        run = train(spec_d, wide)
        assert run.summary["initial_weights"] == reference.weight.reshape(-1).tolist()
        expected = reference.bias.item() if reference.bias is not None else None
        assert run.summary["initial_bias"] == expected
    numpy_run = train(spec.model_copy(update={"backend": "numpy"}), data)
    assert numpy_run.summary["initial_weights"] == [0.0, 0.0, 0.0]
    assert numpy_run.summary["initial_bias"] == 0.0


def test_importing_engines_does_not_import_torch() -> None:
    code = "import sys, workers.engines; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).parents[2])


def test_cuda_when_absent_is_refused() -> None:
    if cuda_available():
        pytest.skip("this machine has CUDA")
    data = make_data(np.random.default_rng(), 20, 2)
    with pytest.raises(DeviceError, match="cuda"):
        train(make_spec(data, device="cuda"), data)
    assert train(make_spec(data, device="auto", epochs=1), data).summary["device"] == "cpu"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("batch_size", [None, 16])
def test_cuda_matches_cpu(batch_size: int | None) -> None:
    data = make_data(np.random.default_rng(), 200, 4, n_test=20)
    spec = make_spec(
        data, epochs=20, batch_size=batch_size, optimizer={"lr": 1e-3, "momentum": 0.9}
    )
    cpu = train(spec, data)
    cuda = train(spec.model_copy(update={"device": "cuda"}), data)
    assert cuda.summary["device"].startswith("cuda")
    assert_close(cuda.losses, cpu.losses, 1e-9)
    assert_close(final_params(cuda), final_params(cpu), 1e-9)
