"""Materialising a spec's data: the tutorial's draws, held-out splits, loaded tables."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from service.datasets import Table
from service.errors import DataError, LimitError
from service.settings import Settings
from service.spec import JobSpec, SyntheticData, held_out_rows, validate
from workers.data import build_train_data, load_spec_table, split_rows, synthetic_arrays


def spec(data: dict[str, Any], **fields: Any) -> JobSpec:
    return validate({"data": data, **fields})


def tutorial_synthetic(n: int, generator: str, seed: int = 0) -> SyntheticData:
    return SyntheticData(
        n_samples=n,
        n_features=3,
        coefficients=[1, 2, 4],
        intercept=3,
        noise_std=1e-6,
        generator=generator,  # type: ignore[arg-type]
        seed=seed,
    )


@pytest.fixture
def global_numpy_rng() -> Iterator[None]:
    state = np.random.get_state()
    yield
    np.random.set_state(state)


@pytest.mark.parametrize("seed", [0, 42])
def test_numpy_generator_reproduces_the_tutorial(global_numpy_rng: None, seed: int) -> None:
    np.random.seed(seed)
    x1 = np.random.normal(0, 1, size=(100, 1))
    x2 = np.random.normal(0, 1, size=(100, 1))
    x3 = np.random.normal(0, 1, size=(100, 1))
    noise = np.random.normal(0, 1, size=(100, 1)) * 1e-6
    y = 1 * x1 + 2 * x2 + 4 * x3 + 3 + noise
    expected_x = np.hstack([x1, x2, x3])

    x_got, y_got = synthetic_arrays(tutorial_synthetic(100, "numpy"), n=100, seed=seed)
    assert x_got.dtype == np.float64 and y_got.shape == (100,)
    np.testing.assert_array_equal(x_got, expected_x)
    np.testing.assert_array_equal(y_got, y.ravel())


@pytest.mark.parametrize("seed", [0, 7])
def test_torch_generator_reproduces_manual_seed_draws(seed: int) -> None:
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        x = torch.normal(0, 1, (1000, 3))
        noise = torch.normal(0, 1, (1000, 1)) * 1e-6
        w = torch.tensor([[1.0], [2.0], [4.0]])
        y = x @ w + 3 + noise

    x_got, y_got = synthetic_arrays(tutorial_synthetic(1000, "torch"), n=1000, seed=seed)
    assert x_got.dtype == np.float64 and y_got.dtype == np.float64
    np.testing.assert_array_equal(x_got, x.double().numpy())
    np.testing.assert_array_equal(y_got, y.double().numpy().ravel())


@pytest.mark.parametrize("generator", ["numpy", "torch"])
def test_draws_depend_on_the_seed_alone(generator: str) -> None:
    s = tutorial_synthetic(50, generator)
    first = synthetic_arrays(s, n=50, seed=1)
    again = synthetic_arrays(s, n=50, seed=1)
    other = synthetic_arrays(s, n=50, seed=2)
    np.testing.assert_array_equal(first[0], again[0])
    np.testing.assert_array_equal(first[1], again[1])
    assert not np.array_equal(first[0], other[0])


def test_default_coefficients_are_one_to_d() -> None:
    s = SyntheticData(n_samples=20, n_features=4, intercept=0.5)
    x, y = synthetic_arrays(s, n=20, seed=3)
    np.testing.assert_allclose(y, x @ np.array([1.0, 2.0, 3.0, 4.0]) + 0.5, rtol=0, atol=1e-12)


# -- synthetic TrainData --------------------------------------------------------------------


def test_synthetic_train_data_carries_the_truth() -> None:
    data = build_train_data(spec({"synthetic": {"n_samples": 30, "coefficients": [1, 2, 4],
                                                "intercept": 3}}))  # fmt: skip
    assert data.x.shape == (30, 3) and data.x_test is None
    np.testing.assert_array_equal(data.true_weights, [1.0, 2.0, 4.0])  # type: ignore[arg-type]
    assert data.true_bias == 3.0


@pytest.mark.parametrize(("n", "fraction"), [(100, 0.2), (10, 0.01), (2, 0.9), (7, 0.5)])
def test_held_out_fraction_sizes_and_partition(n: int, fraction: float) -> None:
    data = build_train_data(
        spec({"synthetic": {"n_samples": n}, "test": {"fraction": fraction}}, seed=5)
    )
    held = held_out_rows(n, fraction)
    assert data.x_test is not None and data.y_test is not None
    assert data.x_test.shape[0] == held and data.x.shape[0] == n - held
    full_x, _ = synthetic_arrays(SyntheticData(n_samples=n), n=n, seed=0)
    train, test = split_rows(n, fraction, seed=5)
    assert sorted([*train.tolist(), *test.tolist()]) == list(range(n))
    # Both parts keep the original row order.
    np.testing.assert_array_equal(data.x, full_x[train])
    np.testing.assert_array_equal(data.x_test, full_x[test])
    assert np.all(np.diff(train) > 0) and np.all(np.diff(test) > 0)


def test_held_out_split_is_deterministic_in_the_job_seed() -> None:
    def split(seed: int) -> np.ndarray:
        data = build_train_data(
            spec({"synthetic": {"n_samples": 200}, "test": {"fraction": 0.25}}, seed=seed)
        )
        assert data.x_test is not None
        return data.x_test

    np.testing.assert_array_equal(split(1), split(1))
    assert not np.array_equal(split(1), split(2))
    np.testing.assert_array_equal(
        split_rows(200, 0.25, seed=1)[1], split_rows(200, 0.25, seed=1)[1]
    )


@pytest.mark.parametrize("generator", ["numpy", "torch"])
def test_fresh_test_draw_differs_from_train(generator: str) -> None:
    synthetic = {"n_samples": 40, "generator": generator, "seed": 11}
    data = build_train_data(spec({"synthetic": synthetic, "test": {"n_samples": 40}}))
    assert data.x_test is not None and data.y_test is not None
    assert data.x.shape == data.x_test.shape == (40, 3)
    assert not np.array_equal(data.x, data.x_test)
    s = SyntheticData(**synthetic)
    np.testing.assert_array_equal(data.x_test, synthetic_arrays(s, n=40, seed=12)[0])

    seeded = build_train_data(spec({"synthetic": synthetic, "test": {"n_samples": 5, "seed": 3}}))
    np.testing.assert_array_equal(seeded.x_test, synthetic_arrays(s, n=5, seed=3)[0])  # type: ignore[arg-type]


def test_fresh_draw_seed_wraps_at_the_top_of_the_range() -> None:
    top = 2**32 - 1
    data = build_train_data(
        spec({"synthetic": {"n_samples": 5, "seed": top}, "test": {"n_samples": 5}})
    )
    np.testing.assert_array_equal(
        data.x_test,  # type: ignore[arg-type]
        synthetic_arrays(SyntheticData(n_samples=5), n=5, seed=0)[0],
    )


# -- table TrainData ------------------------------------------------------------------------


def table(rows: int = 10) -> Table:
    x = np.arange(rows * 3, dtype=np.float64).reshape(rows, 3)
    return Table(columns=["a", "b", "c"], target="Y", x=x, y=x.sum(axis=1))


def test_table_data_is_used_as_given() -> None:
    data = build_train_data(spec({"dataset": "d1"}), table=table())
    np.testing.assert_array_equal(data.x, table().x)
    assert data.true_weights is None and data.x_test is None


def test_table_data_is_split_like_synthetic_data() -> None:
    data = build_train_data(
        spec({"path": "f.csv", "target": "Y", "test": {"fraction": 0.3}}, seed=4), table=table()
    )
    train, test = split_rows(10, 0.3, seed=4)
    np.testing.assert_array_equal(data.x, table().x[train])
    np.testing.assert_array_equal(data.y_test, table().y[test])  # type: ignore[arg-type]


def test_table_features_are_chosen_by_the_spec() -> None:
    data = build_train_data(
        spec({"dataset": "d1", "target": "Y", "features": ["c", "a"]}), table=table()
    )
    np.testing.assert_array_equal(data.x, table().x[:, [2, 0]])


@pytest.mark.parametrize(
    ("data", "fields", "says"),
    [
        (
            {"dataset": "d1"},
            {"model": {"init": {"weights": [1, 2], "bias": 0}}},
            "model.init.weights",
        ),
        ({"dataset": "d1"}, {"batch_size": 11}, "batch_size"),
        ({"dataset": "d1", "test": {"fraction": 0.5}}, {"batch_size": 6}, "batch_size"),
        ({"dataset": "d1", "target": "Z"}, {}, "data.target"),
        ({"dataset": "d1", "features": ["a", "q"]}, {}, "'q'"),
    ],
)
def test_table_data_mismatches_are_refused(
    data: dict[str, Any], fields: dict[str, Any], says: str
) -> None:
    with pytest.raises(DataError, match=re.escape(says)):
        build_train_data(spec(data, **fields), table=table())


def test_table_data_without_a_table_is_refused() -> None:
    with pytest.raises(DataError, match=r"data\.dataset"):
        build_train_data(spec({"dataset": "d1"}))


# -- load_spec_table ------------------------------------------------------------------------


def test_load_spec_table_reads_a_path_inside_the_data_dir(tmp_path: Path) -> None:
    (tmp_path / "data.csv").write_text("x1,x2,Y\n1,2,3\n4,5,6\n7,8,9\n")
    settings = Settings(data_dir=tmp_path)
    loaded = load_spec_table(spec({"path": "data.csv", "target": "Y"}), settings)
    assert loaded is not None and loaded.columns == ["x1", "x2"]
    np.testing.assert_array_equal(loaded.y, [3, 6, 9])
    data = build_train_data(spec({"path": "data.csv", "target": "Y"}), table=loaded)
    np.testing.assert_array_equal(data.x, [[1, 2], [4, 5], [7, 8]])


def test_load_spec_table_applies_the_settings(tmp_path: Path) -> None:
    (tmp_path / "data.csv").write_text("x1,x2,Y\n1,2,3\n4,5,6\n7,8,9\n")
    with pytest.raises(LimitError, match="max_rows"):
        load_spec_table(
            spec({"path": "data.csv", "target": "Y"}), Settings(data_dir=tmp_path, max_rows=2)
        )
    with pytest.raises(LimitError, match="max_dataset_bytes"):
        load_spec_table(
            spec({"path": "data.csv", "target": "Y"}),
            Settings(data_dir=tmp_path, max_dataset_bytes=5),
        )
    with pytest.raises(DataError, match=r"'\.\.'"):
        load_spec_table(spec({"path": "../data.csv", "target": "Y"}), Settings(data_dir=tmp_path))


def test_load_spec_table_is_none_for_synthetic_and_registered_data(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path)
    assert load_spec_table(spec({"synthetic": {}}), settings) is None
    assert load_spec_table(spec({"dataset": "d1", "target": "Y"}), settings) is None
