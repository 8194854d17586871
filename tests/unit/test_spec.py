"""JobSpec: parsing, overrides, grids, limits and the format of every refusal."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest

from service import spec
from service.errors import LimitError, SpecError
from service.settings import Settings
from tests.support import DELETE, small_spec, with_changes


def base() -> dict[str, Any]:
    """A small valid spec; each test changes one thing."""
    return small_spec()


def refusal(document: dict[str, Any]) -> str:
    with pytest.raises(SpecError) as caught:
        spec.validate(document)
    return str(caught.value)


def nested(levels: int) -> dict[str, Any]:
    """A mapping ``levels`` deep with a scalar at the bottom."""
    value: Any = 1
    for _ in range(levels):
        value = {"k": value}
    return dict(value)


# -- parsing ---------------------------------------------------------------------------------


def test_yaml_and_json_give_the_same_document() -> None:
    yaml_text = b"name: a\noptimizer: {lr: 1.0e-4, nesterov: false}\nbatch_size: null\ntags: [x]\n"
    json_text = json.dumps(
        {
            "name": "a",
            "optimizer": {"lr": 1e-4, "nesterov": False},
            "batch_size": None,
            "tags": ["x"],
        }
    ).encode()
    from_yaml = spec.parse_document(yaml_text)
    assert from_yaml == spec.parse_document(json_text)
    assert from_yaml["optimizer"]["lr"] == 1e-4
    assert isinstance(from_yaml["optimizer"]["lr"], float)
    assert from_yaml["batch_size"] is None


def test_the_example_specs_are_valid() -> None:
    examples = sorted((Path(__file__).resolve().parents[2] / "examples").glob("*.yaml"))
    assert examples
    for path in examples:
        job = spec.validate(spec.load_document(path))
        assert job.name


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        pytest.param(b"", "s.yaml: empty", id="empty"),
        pytest.param(b"  \n\t\n", "s.yaml: empty", id="whitespace"),
        pytest.param(b"name: \xff\xfe\n", "s.yaml: not UTF-8 text (byte 6)", id="not-utf8"),
        pytest.param(b"- a\n- b\n", "s.yaml: must be a mapping of fields, got list", id="list"),
        pytest.param(b"[1, 2]", "s.yaml: must be a mapping of fields, got list", id="json-list"),
        pytest.param(b"42\n", "s.yaml: must be a mapping of fields, got int", id="scalar"),
        pytest.param(b"~\n", "s.yaml: must be a mapping of fields, got NoneType", id="null"),
        pytest.param(b"name: [1\n", "s.yaml: not valid YAML or JSON at line 2", id="bad-yaml"),
        pytest.param(
            b'{"name": "a"\n\n', "s.yaml: not valid YAML or JSON at line 3", id="bad-json"
        ),
        pytest.param(b"{1: 2}\n", "s.yaml: field names must be strings, got 1", id="int-key"),
        pytest.param(
            json.dumps(nested(spec.MAX_SPEC_DEPTH + 1)).encode(),
            "s.yaml: nested too deeply",
            id="deep",
        ),
        pytest.param(b"[" * 100_000, "s.yaml: nested too deeply", id="recursion"),
        pytest.param(
            b"name: " + b"x" * spec.MAX_SPEC_BYTES,
            f"s.yaml: larger than {spec.MAX_SPEC_BYTES} bytes",
            id="too-large",
        ),
    ],
)
def test_parse_document_refusals(raw: bytes, expected: str) -> None:
    with pytest.raises(SpecError) as caught:
        spec.parse_document(raw, "s.yaml")
    assert str(caught.value) == expected


def test_nesting_up_to_the_limit_is_accepted() -> None:
    document = spec.parse_document(json.dumps(nested(spec.MAX_SPEC_DEPTH)).encode())
    assert document == nested(spec.MAX_SPEC_DEPTH)


def alias_bomb(levels: int) -> bytes:
    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x]"]
    for i in range(1, levels):
        lines.append(f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 9)}]")
    return ("\n".join(lines) + "\n").encode()


def test_a_yaml_alias_bomb_is_refused_quickly() -> None:
    raw = alias_bomb(10)  # under 600 bytes; 9**10 values once expanded
    assert len(raw) < 600
    with pytest.raises(SpecError, match=r"s\.yaml: more than \d+ values"):
        spec.parse_document(raw, "s.yaml")


def test_small_shared_aliases_are_fine() -> None:
    document = spec.parse_document(b"a: &v [1, 2]\nb: *v\n")
    assert document == {"a": [1, 2], "b": [1, 2]}


def test_yaml_tags_that_would_run_code_are_refused(tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    raw = f'name: !!python/object/apply:os.system ["touch {marker}"]\n'.encode()
    with pytest.raises(SpecError, match="not valid YAML or JSON"):
        spec.parse_document(raw)
    assert not marker.exists()


def test_load_document_names_the_file(tmp_path: Path) -> None:
    missing = tmp_path / "nope.yaml"
    with pytest.raises(SpecError, match=r"nope\.yaml: cannot read \(No such file or directory\)"):
        spec.load_document(missing)
    with pytest.raises(SpecError, match=r"cannot read \(Is a directory\)"):
        spec.load_document(tmp_path)
    path = tmp_path / "s.yaml"
    path.write_text("name: a\n")
    assert spec.load_document(path) == {"name": "a"}


# -- --set --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("1.0e-3", 0.001),
        ("3", 3),
        ("null", None),
        ("~", None),
        ("true", True),
        ("false", False),
        ("[1, 2.5]", [1, 2.5]),
        ("{weights: [1], bias: 0}", {"weights": [1], "bias": 0}),
        ("abc", "abc"),
        ("", ""),
        ("'quoted: text'", "quoted: text"),
        ("'); DROP TABLE jobs;--", "'); DROP TABLE jobs;--"),  # not YAML: kept as typed
    ],
)
def test_parse_value_reads_yaml_scalars(text: str, value: Any) -> None:
    parsed = spec.parse_value(text)
    assert parsed == value
    assert type(parsed) is type(value)


def test_overrides_set_typed_values_on_a_copy() -> None:
    document = base()
    out = spec.apply_overrides(
        document,
        [
            "optimizer.lr=1e-3",
            "batch_size=null",
            "model.init={weights: [0.5, 1], bias: 2}",
            "data.test.fraction=0.5",
            "tags=[a, b]",
            "optimizer.momentum=0.9",
        ],
    )
    assert document == base()
    job = spec.validate(out)
    assert job.optimizer.lr == 0.001
    assert isinstance(job.optimizer.lr, float)
    assert job.batch_size is None
    assert isinstance(job.model.init, spec.ExplicitInit)
    assert job.model.init.weights == [0.5, 1.0]
    assert job.model.init.bias == 2.0
    assert job.data.test is not None and job.data.test.fraction == 0.5
    assert job.tags == ["a", "b"]
    assert job.optimizer.momentum == 0.9


def test_overrides_create_missing_mappings() -> None:
    document: dict[str, Any] = {"data": {"synthetic": {}}}
    out = spec.apply_overrides(document, ["loss.reduction=mean", "data.synthetic.seed=7"])
    assert out == {"data": {"synthetic": {"seed": 7}}, "loss": {"reduction": "mean"}}
    assert spec.validate(out).loss.reduction == "mean"


def test_override_value_may_contain_equals_signs() -> None:
    out = spec.apply_overrides(base(), ["name=a=b"])
    assert out["name"] == "a=b"


@pytest.mark.parametrize(
    ("item", "expected"),
    [
        ("epochs", "--set 'epochs': expected key.path=value"),
        ("=3", "--set '=3': expected key.path=value"),
        ("optimizer..lr=1", "--set 'optimizer..lr=1': expected key.path=value"),
        ("optimizer.=1", "--set 'optimizer.=1': expected key.path=value"),
        ("epochs.x=1", "--set epochs.x: epochs is not a mapping"),
        (
            "data.synthetic.seed.x=1",
            "--set data.synthetic.seed.x: data.synthetic.seed is not a mapping",
        ),
        ("name=" + "[" * 40 + "]" * 40, "--set name: nested too deeply"),
        ("name=" + "[" * 5000 + "]" * 5000, "--set name: nested too deeply"),
    ],
)
def test_bad_overrides_are_refused(item: str, expected: str) -> None:
    with pytest.raises(SpecError) as caught:
        spec.apply_overrides(base(), [item])
    assert str(caught.value) == expected


def test_an_alias_bomb_in_an_override_is_refused() -> None:
    levels = ["&a0 [1, 1, 1, 1, 1, 1, 1, 1, 1]"]
    levels += [f"&a{i} [{', '.join([f'*a{i - 1}'] * 9)}]" for i in range(1, 8)]
    with pytest.raises(SpecError, match=r"^--set name: more than \d+ values"):
        spec.apply_overrides(base(), [f"name=[{', '.join(levels)}]"])


# -- validation messages ---------------------------------------------------------------------


def with_change(path: str, value: Any) -> dict[str, Any]:
    document = base()
    spec.set_path(document, path.split("."), value, "test")
    return document


#: (field path, new value or DELETE, the line the refusal must contain)
REFUSALS: list[tuple[str, Any, str]] = [
    ("optimizer.lr", -1, "optimizer.lr: must be > 0, got -1"),
    ("optimizer.lr", 0, "optimizer.lr: must be > 0, got 0"),
    ("optimizer.lr", math.nan, "optimizer.lr: must be a finite number, got nan"),
    ("optimizer.lr", math.inf, "optimizer.lr: must be a finite number, got inf"),
    ("optimizer.lr", "fast", 'optimizer.lr: must be a number, got "fast"'),
    ("optimizer.lr", True, "optimizer.lr: must be a number, got True"),
    ("optimizer.momentum", -0.5, "optimizer.momentum: must be >= 0, got -0.5"),
    ("epochs", 0, "epochs: must be > 0, got 0"),
    ("epochs", 2.5, "epochs: must be an integer, got 2.5"),
    ("epochs", "ten", 'epochs: must be an integer, got "ten"'),
    ("epochs", [3], "epochs: must be an integer, got [3]"),
    ("batch_size", -4, "batch_size: must be > 0, got -4"),
    ("batch_size", 31, "batch_size: 31 is more than the 30 training rows"),
    ("seed", 2**32, "seed: must be < 4294967296, got 4294967296"),
    ("data.synthetic.n_samples", 1, "data.synthetic.n_samples: must be > 1, got 1"),
    ("data.synthetic.n_features", 0, "data.synthetic.n_features: must be > 0, got 0"),
    (
        "data.synthetic.n_features",
        3,
        "data.synthetic.coefficients: expected 3 values (n_features), got 2",
    ),
    ("data.synthetic.noise_std", -1, "data.synthetic.noise_std: must be >= 0, got -1"),
    (
        "data.synthetic.generator",
        "jax",
        "data.synthetic.generator: must be one of 'numpy' or 'torch', got \"jax\"",
    ),
    ("data.test.fraction", 1, "data.test.fraction: must be < 1, got 1"),
    ("data.test.fraction", 0, "data.test.fraction: must be > 0, got 0"),
    ("backend", "jax", "backend: must be one of 'torch' or 'numpy', got \"jax\""),
    ("device", "tpu", "device: must be one of 'cpu', 'cuda' or 'auto', got \"tpu\""),
    ("device", "cuda", "device: the numpy backend runs on the cpu only"),
    ("dtype", "float16", "dtype: must be one of 'float32' or 'float64', got \"float16\""),
    ("loss.reduction", "max", "loss.reduction: must be one of 'sum' or 'mean', got \"max\""),
    ("shuffle", [1], "shuffle: must be true or false, got [1]"),
    ("name", "", 'name: string should have at least 1 character, got ""'),
    ("name", 5, "name: input should be a valid string, got 5"),
    ("tags", "x", "tags: input should be a valid list"),
    ("optimizer", 5, "optimizer: must be a mapping, got 5"),
    ("optimizer.nesterov", True, "optimizer.nesterov: needs momentum > 0 and dampening = 0"),
    ("model.init", "ones", "model.init: must be 'default', 'zeros' or {weights, bias}, got 'ones'"),
    (
        "model.init",
        {"weights": [1, 2, 3], "bias": 0},
        "model.init.weights: expected 2 values (data.synthetic.n_features), got 3",
    ),
    ("model.init", {"weights": [1, 2]}, "model.init.bias: required when fit_intercept is true"),
    (
        "data.path",
        "d.csv",
        "data: give exactly one of synthetic, path or dataset (got synthetic, path)",
    ),
    ("data.synthetic", DELETE, "data: give exactly one of synthetic, path or dataset"),
    ("data", DELETE, "data: required"),
    ("data.target", "Y", "data: target/features: only for path or dataset data"),
    ("surprise", 1, "surprise: unknown field"),
    ("Surprise", 1, "Surprise: unknown field"),
    ("optimizer.LR", 1, "optimizer.LR: unknown field"),
    ("data.synthetic.extra", 1, "data.synthetic.extra: unknown field"),
    ("data.test.extra", 1, "data.test.extra: unknown field"),
    ("loss.extra", 1, "loss.extra: unknown field"),
    ("model.init", {"weights": [1, 2], "bias": 0, "Extra": 1}, "model.init.Extra: unknown field"),
]


@pytest.mark.parametrize(
    ("path", "value", "expected"), REFUSALS, ids=[f"{p}={v!r}" for p, v, _ in REFUSALS]
)
def test_validation_messages_name_the_field(path: str, value: Any, expected: str) -> None:
    document = with_changes(base(), {path: value})
    assert expected in refusal(document).split("; ")


def test_every_problem_is_reported_once_on_one_line() -> None:
    document = with_change("optimizer.lr", -1)
    document["epochs"] = 0
    document["extra"] = True
    message = refusal(document)
    assert message.split("; ") == [
        "optimizer.lr: must be > 0, got -1",
        "epochs: must be > 0, got 0",
        "extra: unknown field",
    ]
    assert "\n" not in message


def test_long_values_are_shortened_in_messages() -> None:
    message = refusal(with_change("backend", "x" * 500))
    assert len(message) < 150
    assert message.endswith('..."') or message.endswith("...")


def test_test_set_needs_exactly_one_kind() -> None:
    assert refusal(with_change("data.test", {})) == (
        "data.test: give exactly one of fraction or n_samples"
    )
    assert refusal(with_change("data.test", {"fraction": 0.2, "n_samples": 5})) == (
        "data.test: give exactly one of fraction or n_samples"
    )
    assert refusal(with_change("data.test", {"fraction": 0.2, "seed": 1})) == (
        "data.test.seed: only for a fresh draw (n_samples)"
    )


# -- grids ------------------------------------------------------------------------------------


def test_grid_expands_to_the_product_with_point_names() -> None:
    specs = spec.expand(base(), ["optimizer.lr=1.0e-4,0.001", "batch_size=5,10,null"])
    assert len(specs) == 6
    assert [s.name for s in specs] == [
        "base[lr=0.0001,batch_size=5]",
        "base[lr=0.0001,batch_size=10]",
        "base[lr=0.0001,batch_size=None]",
        "base[lr=0.001,batch_size=5]",
        "base[lr=0.001,batch_size=10]",
        "base[lr=0.001,batch_size=None]",
    ]
    assert [(s.optimizer.lr, s.batch_size) for s in specs] == [
        (1e-4, 5), (1e-4, 10), (1e-4, None), (1e-3, 5), (1e-3, 10), (1e-3, None),
    ]  # fmt: skip


def test_no_grid_is_one_spec_with_its_own_name() -> None:
    (only,) = spec.expand(base())
    assert only.name == "base"


def test_grid_names_stay_within_the_name_limit() -> None:
    document = with_change("name", "n" * 200)
    (point,) = spec.expand(document, ["epochs=4"])
    assert len(point.name) == 200


def test_an_invalid_grid_point_is_named() -> None:
    with pytest.raises(SpecError) as caught:
        spec.expand(base(), ["optimizer.lr=0.1,-1", "epochs=2,3"])
    assert str(caught.value) == "grid point lr=-1, epochs=2: optimizer.lr: must be > 0, got -1"


@pytest.mark.parametrize(
    ("grid", "expected"),
    [
        (["epochs"], "--grid 'epochs': expected key.path=value"),
        (["=1,2"], "--grid '=1,2': expected key.path=value"),
        (["epochs="], "--grid epochs: empty value in ''"),
        (["epochs=1,,2"], "--grid epochs: empty value in '1,,2'"),
        (["epochs=1,2", "epochs=3"], "--grid epochs: given twice"),
        (["epochs.x=1,2"], "--grid epochs.x: epochs is not a mapping"),
        (["optimizer.typo=1,2"], "grid point typo=1: optimizer.typo: unknown field"),
        (["name=" + "[" * 30 + "]" * 30], "--grid name: nested too deeply"),
    ],
)
def test_bad_grids_are_refused(grid: list[str], expected: str) -> None:
    with pytest.raises(SpecError) as caught:
        spec.expand(base(), grid)
    assert str(caught.value) == expected


def test_grid_past_the_point_limit_is_refused_before_expanding() -> None:
    values = ",".join(str(i) for i in range(1, 101))
    with pytest.raises(LimitError) as caught:
        spec.expand(base(), [f"epochs={values}", f"seed={values}"], max_points=9_999)
    assert str(caught.value) == "--grid: 10000 points, more than the limit of 9999"


# -- limits -----------------------------------------------------------------------------------


def limits(**values: int) -> Settings:
    return Settings(**values)


@pytest.mark.parametrize(
    ("change", "settings", "expected"),
    [
        ({"epochs": 11}, {"max_epochs": 10}, "epochs: 11, more than the limit of 10"),
        (
            {"data.synthetic.n_samples": 41},
            {"max_rows": 40},
            "data.synthetic.n_samples: 41 rows, more than the limit of 40",
        ),
        (
            {"data.synthetic.n_features": 3, "data.synthetic.coefficients": None},
            {"max_features": 2},
            "data.synthetic.n_features: 3 features, more than the limit of 2",
        ),
        (
            {"epochs": 5},
            {"max_row_epochs": 199},
            "epochs: 40 rows x 5 epochs, more than the limit of 199",
        ),
        (
            {"data.test": {"n_samples": 10}},
            {"max_rows": 49},
            "data.synthetic.n_samples: 50 rows, more than the limit of 49",
        ),
    ],
)
def test_limits_name_the_field(
    change: dict[str, Any], settings: dict[str, int], expected: str
) -> None:
    document = base()
    for path, value in change.items():
        spec.set_path(document, path.split("."), value, "test")
    job = spec.validate(document)
    spec.check_limits(job, Settings())
    with pytest.raises(LimitError) as caught:
        spec.check_limits(job, limits(**settings))
    assert str(caught.value) == expected


def test_limits_at_the_boundary_are_accepted() -> None:
    job = spec.validate(with_change("epochs", 5))
    spec.check_limits(
        job, limits(max_epochs=5, max_rows=40, max_features=2, max_row_epochs=200, max_steps=15)
    )


@pytest.mark.parametrize(
    ("change", "max_steps", "expected"),
    [
        (
            {"batch_size": 1, "epochs": 5},
            149,
            "batch_size: 5 epochs x 30 steps each (batch_size 1 of 30 training rows) is 150 "
            "optimizer steps, more than the limit of 149",
        ),
        (
            {"batch_size": 7, "epochs": 5},
            24,  # ceil(30 / 7) = 5 steps an epoch, the last batch short
            "batch_size: 5 epochs x 5 steps each (batch_size 7 of 30 training rows) is 25 "
            "optimizer steps, more than the limit of 24",
        ),
        (
            {"batch_size": None, "epochs": 11},
            10,
            "epochs: 11 epochs x 1 steps each (batch_size full of 30 training rows) is 11 "
            "optimizer steps, more than the limit of 10",
        ),
    ],
)
def test_the_step_budget_counts_batches(
    change: dict[str, Any], max_steps: int, expected: str
) -> None:
    job = spec.validate(with_changes(base(), change))
    spec.check_limits(job, limits(max_steps=max_steps + 1))
    with pytest.raises(LimitError) as caught:
        spec.check_limits(job, limits(max_steps=max_steps))
    assert str(caught.value) == expected


def test_a_batch_of_one_inside_the_row_epoch_budget_is_refused_by_default() -> None:
    """1e7 rows x 5000 epochs is the row x epoch budget, but 5e10 steps at batch_size 1."""
    changes = {
        "data.synthetic.n_samples": 10_000_000,
        "data.test": DELETE,
        "epochs": 5000,
        "batch_size": 1,
    }
    job = spec.validate(with_changes(base(), changes))
    with pytest.raises(LimitError, match=r"^batch_size: .* 50000000000 optimizer steps, more "):
        spec.check_limits(job, Settings())
    spec.check_limits(
        spec.validate(with_changes(base(), {**changes, "batch_size": 1000})), Settings()
    )


def test_the_step_budget_of_a_file_uses_its_training_rows() -> None:
    document = base()
    document["data"] = {"path": "d.csv", "target": "Y", "test": {"fraction": 0.5}}
    document["batch_size"] = 2
    job = spec.validate(document)
    spec.check_limits(job, limits(max_steps=15), rows=20, features=2)  # 3 x ceil(10 / 2)
    with pytest.raises(LimitError, match=r"^batch_size: 3 epochs x 5 steps each .* of 10 train"):
        spec.check_limits(job, limits(max_steps=14), rows=20, features=2)


def test_file_limits_use_the_given_rows_and_features() -> None:
    document = base()
    document["data"] = {"path": "d.csv", "target": "Y"}
    document["batch_size"] = None
    job = spec.validate(document)
    with pytest.raises(LimitError, match=r"^data: 101 rows, more than the limit of 100$"):
        spec.check_limits(job, limits(max_rows=100), rows=101, features=2)
    with pytest.raises(LimitError, match=r"^data.features: 3 features, more than the limit of 2$"):
        spec.check_limits(job, limits(max_features=2), rows=10, features=3)


# -- flatten ----------------------------------------------------------------------------------


def test_flatten_joins_paths_and_keeps_lists() -> None:
    job = spec.validate(base())
    flat = spec.flatten(job.to_json())
    assert flat["optimizer.lr"] == 0.001
    assert flat["data.synthetic.coefficients"] == [1.0, 2.0]
    assert flat["data.test.fraction"] == 0.25
    assert flat["model.init"] == "zeros"
    assert flat["tags"] == []
    assert not any(isinstance(v, dict) for v in flat.values())
    assert spec.flatten({"a": {"b": {"c": 1}}, "d": [{"e": 1}]}) == {"a.b.c": 1, "d": [{"e": 1}]}
    assert spec.flatten({}) == {}


def test_spec_round_trips_through_json() -> None:
    job = spec.validate(base())
    assert spec.validate(json.loads(json.dumps(job.to_json()))) == job
