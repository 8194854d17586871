"""Bad input is refused at the edge: exit 2, the field or column named, nothing written, nothing
queued. `lrq run` takes a table of bad specs and data files; `lrq submit` and `lrq datasets add`
run against a real database and Redis, with a property test mutating a valid spec."""

from __future__ import annotations

import copy
import json
import math
import os
import shutil
import string
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.support import DELETE, run_cli, small_spec, state_counts, with_changes

#: Limits small enough to cross with a small spec; every test here runs under them.
LIMITS = {
    "LRQ_MAX_EPOCHS": "1000",
    "LRQ_MAX_ROWS": "100000",
    "LRQ_MAX_FEATURES": "50",
    "LRQ_MAX_ROW_EPOCHS": "1000000",
    "LRQ_MAX_GRID_POINTS": "20",
    "LRQ_MAX_DATASET_BYTES": "4096",
    "LRQ_MAX_STEPS": "100000",
}

BASE: dict[str, Any] = small_spec()
GOOD_CSV = b"X1,X2,Y\n1,2,5\n2,1,4\n3,3,9\n4,1,6\n0,2,4\n5,5,15\n"


def changed(changes: dict[str, Any]) -> dict[str, Any]:
    """BASE with ``{"a.b": value}`` changes applied (DELETE removes the field)."""
    return with_changes(BASE, changes)


def dump(document: dict[str, Any]) -> bytes:
    return yaml.safe_dump(document, sort_keys=False).encode()


def nested(levels: int) -> Any:
    value: Any = 1
    for i in range(levels):
        value = {"k": value} if i % 2 else [value]
    return value


def alias_bomb(levels: int) -> bytes:
    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x]"]
    for i in range(1, levels):
        lines.append(f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 9)}]")
    return ("\n".join(lines) + "\n").encode()


# -- data files ---------------------------------------------------------------------------------

Maker = Callable[[Path, Path], str]


def csv_file(content: bytes, name: str = "bad.csv") -> Maker:
    def make(data: Path, _outside: Path) -> str:
        (data / name).write_bytes(content)
        return name

    return make


def dot_dot(data: Path, _outside: Path) -> str:
    (data / "sub").mkdir()
    return "sub/../good.csv"


def symlink(data: Path, _outside: Path) -> str:
    (data / "link.csv").symlink_to(data / "good.csv")
    return "link.csv"


def symlinked_directory(data: Path, outside: Path) -> str:
    (outside / "secret.csv").write_bytes(GOOD_CSV)
    (data / "linked").symlink_to(outside)
    return "linked/secret.csv"


def outside_file(_data: Path, outside: Path) -> str:
    (outside / "secret.csv").write_bytes(GOOD_CSV)
    return str(outside / "secret.csv")


def hard_link(data: Path, outside: Path) -> str:
    """A second name inside the data directory for a file outside it: no path walk sees it."""
    (outside / "secret.csv").write_bytes(GOOD_CSV)
    os.link(outside / "secret.csv", data / "linked.csv")
    return "linked.csv"


def directory(data: Path, _outside: Path) -> str:
    (data / "folder.csv").mkdir()
    return "folder.csv"


def missing(_data: Path, _outside: Path) -> str:
    return "nope.csv"


BIG_CSV = b"X1,X2,Y\n" + b"1.000001,2.000001,5.000001\n" * 200


@dataclass(frozen=True)
class DataFault:
    id: str
    make: Maker
    expected: str


DATA_FAULTS = [
    DataFault(
        "missing-target",
        csv_file(b"X1,X2,Z\n1,2,5\n2,1,4\n3,3,9\n"),
        "bad.csv: no column 'Y' (the target); columns: X1, X2, Z",
    ),
    DataFault(
        "non-numeric-cell",
        csv_file(b"X1,X2,Y\n1,2,5\n2,abc,4\n3,3,9\n"),
        "bad.csv: column 'X2', data row 2 (line 3): not a number: 'abc'",
    ),
    DataFault(
        "empty-cell",
        csv_file(b"X1,X2,Y\n1,,5\n2,1,4\n3,3,9\n"),
        "bad.csv: column 'X2', data row 1 (line 2): empty cell",
    ),
    DataFault(
        "nan",
        csv_file(b"X1,X2,Y\n1,2,5\n2,1,4\n3,nan,9\n"),
        "bad.csv: column 'X2', data row 3 (line 4): NaN (nan)",
    ),
    DataFault(
        "inf",
        csv_file(b"X1,X2,Y\n1,2,inf\n2,1,4\n3,3,9\n"),
        "bad.csv: column 'Y', data row 1 (line 2): infinite (inf)",
    ),
    DataFault(
        "ragged-row",
        csv_file(b"X1,X2,Y\n1,2,5\n2,1\n3,3,9\n"),
        "bad.csv: data row 2 (line 3): 2 fields, but the header has 3",
    ),
    DataFault("one-row", csv_file(b"X1,X2,Y\n1,2,5\n"), "bad.csv: 1 data row; need at least 2"),
    DataFault(
        "more-features-than-rows",
        csv_file(b"X1,X2,X3,Y\n1,2,3,4\n2,3,4,5\n"),
        "bad.csv: 3 feature columns but only 2 data rows; need at least as many rows as features",
    ),
    DataFault("header-only", csv_file(b"X1,X2,Y\n"), "bad.csv: a header and no data rows"),
    DataFault("empty-file", csv_file(b""), "bad.csv: empty file"),
    DataFault(
        "not-utf8",
        csv_file(b"X1,X2,Y\n1,2,5\n2,\xff,4\n"),
        "bad.csv: not UTF-8 text (line 3, byte 16)",
    ),
    DataFault(
        "over-the-byte-limit",
        csv_file(BIG_CSV),
        f"bad.csv: {len(BIG_CSV)} bytes, more than the limit of 4096 (max_dataset_bytes)",
    ),
    DataFault(
        "unknown-type",
        csv_file(GOOD_CSV, "data.json"),
        "data.json: unknown file type '.json'",
    ),
    DataFault("dot-dot", dot_dot, "data.path 'sub/../good.csv': '..' is not allowed"),
    DataFault("symlink", symlink, "data.path 'link.csv': symbolic links are not allowed"),
    DataFault(
        "symlinked-directory",
        symlinked_directory,
        "data.path 'linked/secret.csv': symbolic links are not allowed",
    ),
    DataFault("outside-data-dir", outside_file, "secret.csv is outside the data directory"),
    DataFault("hard-link", hard_link, "linked.csv: a file with 2 hard links is not read"),
    DataFault("missing-file", missing, "data.path 'nope.csv': no such file"),
    DataFault("directory", directory, "data.path 'folder.csv': not a regular file"),
]


def file_spec(path: str, **data: Any) -> dict[str, Any]:
    return changed({"data": {"path": path, "target": "Y", **data}, "batch_size": DELETE})


# -- `lrq run`: a table of refusals -------------------------------------------------------------


@dataclass(frozen=True)
class RunCase:
    id: str
    expected: str
    document: dict[str, Any] = field(default_factory=lambda: copy.deepcopy(BASE))
    raw: bytes | None = None
    args: tuple[str, ...] = ()
    make: Maker | None = None

    def spec_bytes(self) -> bytes:
        return self.raw if self.raw is not None else dump(self.document)


def case(id: str, expected: str, changes: dict[str, Any] | None = None, **kw: Any) -> RunCase:
    return RunCase(id, expected, changed(changes or {}), **kw)


NOT_UTF8 = dump(BASE).replace(b"numpy", b"num\xffpy", 1)

RUN_CASES = [
    case(
        "coefficient-overflows-the-data",
        "data.synthetic.coefficients[1]: must be <= 1e+09, got 1e+308",
        {"data.synthetic.coefficients": [1.0, 1e308]},
    ),
    case(
        "intercept-overflows-the-data",
        "data.synthetic.intercept: must be >= -1e+09, got -1e+300",
        {"data.synthetic.intercept": -1e300},
    ),
    case(
        "noise-overflows-the-data",
        "data.synthetic.noise_std: must be <= 1e+09, got 1e+200",
        {"data.synthetic.noise_std": 1e200},
    ),
    case(
        "eval-every-past-any-run",
        "eval_every: must be <= 1000000000, got 1000000000000",
        {"eval_every": 10**400},
    ),
    case("name-with-nul", "name: must not contain a NUL character", {"name": "a\x00b"}),
    case("tag-with-nul", "tags[1]: must not contain a NUL character", {"tags": ["ok", "\x00"]}),
    case("lr-negative", "optimizer.lr: must be > 0, got -1", {"optimizer.lr": -1}),
    case("lr-wrong-type", 'optimizer.lr: must be a number, got "fast"', {"optimizer.lr": "fast"}),
    case("epochs-float", "epochs: must be an integer, got 2.5", {"epochs": 2.5}),
    case("epochs-bool", "epochs: must be a number, got True", {"epochs": True}),
    case("name-number", "name: input should be a valid string, got 7", {"name": 7}),
    case("batch-zero", "batch_size: must be > 0, got 0", {"batch_size": 0}),
    case(
        "samples-negative",
        "data.synthetic.n_samples: must be > 1, got -5",
        {"data.synthetic.n_samples": -5},
    ),
    case(
        "features-zero",
        "data.synthetic.n_features: must be > 0, got 0",
        {"data.synthetic.n_features": 0},
    ),
    case("lr-nan", "optimizer.lr: must be a finite number, got nan", {"optimizer.lr": math.nan}),
    case(
        "decay-inf",
        "optimizer.weight_decay: must be a finite number, got inf",
        {"optimizer.weight_decay": math.inf},
    ),
    case(
        "intercept-minus-inf",
        "data.synthetic.intercept: must be a finite number, got -inf",
        {"data.synthetic.intercept": -math.inf},
    ),
    case("unknown-top", "colour: unknown field", {"colour": "red"}),
    case("unknown-capitalised", "Epochs: unknown field", {"Epochs": 3}),
    case("unknown-in-data", "data.format: unknown field", {"data.format": "csv"}),
    case(
        "unknown-in-synthetic", "data.synthetic.noise: unknown field", {"data.synthetic.noise": 1}
    ),
    case("unknown-in-test", "data.test.size: unknown field", {"data.test.size": 3}),
    case("unknown-in-optimizer", "optimizer.betas: unknown field", {"optimizer.betas": [0.9]}),
    case(
        "unknown-in-init",
        "model.init.scale: unknown field",
        {"model.init": {"weights": [1, 2], "bias": 0, "scale": 2}},
    ),
    case(
        "backend-enum",
        "backend: must be one of 'torch' or 'numpy', got \"jax\"",
        {"backend": "jax"},
    ),
    case(
        "reduction-enum",
        "loss.reduction: must be one of 'sum' or 'mean', got \"max\"",
        {"loss.reduction": "max"},
    ),
    case(
        "device-enum",
        "device: must be one of 'cpu', 'cuda' or 'auto', got \"tpu\"",
        {"device": "tpu"},
    ),
    case(
        "nesterov-without-momentum",
        "optimizer.nesterov: needs momentum > 0 and dampening = 0",
        {"optimizer.nesterov": True},
    ),
    case(
        "coefficients-length",
        "data.synthetic.coefficients: expected 2 values (n_features), got 3",
        {"data.synthetic.coefficients": [1, 2, 3]},
    ),
    case("batch-over-rows", "batch_size: 31 is more than the 30 training rows", {"batch_size": 31}),
    case(
        "init-length",
        "model.init.weights: expected 2 values (data.synthetic.n_features), got 1",
        {"model.init": {"weights": [1], "bias": 0}},
    ),
    case(
        "two-sources",
        "data: give exactly one of synthetic, path or dataset (got synthetic, path)",
        {"data.path": "good.csv", "data.target": "Y"},
    ),
    case(
        "no-source",
        "data: give exactly one of synthetic, path or dataset",
        {"data.synthetic": DELETE},
    ),
    case("no-data", "data: required", {"data": DELETE}),
    case("test-fraction", "data.test.fraction: must be < 1, got 1.5", {"data.test.fraction": 1.5}),
    case("test-fraction-zero", "data.test.fraction: must be > 0, got 0", {"data.test.fraction": 0}),
    case("set-syntax", "--set 'epochs': expected key.path=value", args=("--set", "epochs")),
    case("set-empty-key", "--set '=3': expected key.path=value", args=("--set", "=3")),
    case(
        "set-through-a-value",
        "--set epochs.max: epochs is not a mapping",
        args=("--set", "epochs.max=3"),
    ),
    case("set-bad-value", "optimizer.lr: must be > 0, got -1", args=("--set", "optimizer.lr=-1")),
    case("set-unknown", "optimiser: unknown field", args=("--set", "optimiser.lr=0.1")),
    case(
        "set-nested-too-deeply",
        "--set name: nested too deeply",
        args=("--set", "name=" + "[" * 30 + "]" * 30),
    ),
    case("empty-file", "spec.yaml: empty", raw=b""),
    case("blank-file", "spec.yaml: empty", raw=b"\n   \n\t\n"),
    case("not-utf8", "spec.yaml: not UTF-8 text (byte ", raw=NOT_UTF8),
    case("yaml-list", "spec.yaml: must be a mapping of fields, got list", raw=b"- epochs: 3\n"),
    case("not-yaml", "spec.yaml: not valid YAML or JSON at line 2", raw=b"epochs: [3\n"),
    case(
        "python-tag",
        "spec.yaml: not valid YAML or JSON",
        raw=b"name: !!python/object/apply:os.getpid []\n",
    ),
    case("deep", "spec.yaml: nested too deeply", {"name": nested(40)}),
    case(
        "deeper-than-the-parser",
        "spec.yaml: nested too deeply",
        raw=b"a: " + b"[" * 50_000 + b"]" * 50_000,
    ),
    case("alias-bomb", "spec.yaml: more than 1048576 values", raw=alias_bomb(10)),
    case("epochs-over-limit", "epochs: 1001, more than the limit of 1000", {"epochs": 1001}),
    case(
        "rows-times-epochs-over-limit",
        "epochs: 2000 rows x 600 epochs, more than the limit of 1000000",
        {"data.synthetic.n_samples": 2000, "epochs": 600},
    ),
    case(
        "steps-over-limit",
        "batch_size: 1000 epochs x 150 steps each (batch_size 1 of 150 training rows) is 150000 "
        "optimizer steps, more than the limit of 100000",
        {"data.synthetic.n_samples": 200, "epochs": 1000, "batch_size": 1},
    ),
    case(
        "rows-over-limit",
        "data.synthetic.n_samples: 100001 rows, more than the limit of 100000",
        {"data.synthetic.n_samples": 100001},
    ),
    case(
        "features-over-limit",
        "data.synthetic.n_features: 51 features, more than the limit of 50",
        {"data.synthetic.n_features": 51, "data.synthetic.coefficients": DELETE},
    ),
    case(
        "dataset-needs-submit",
        "data.dataset: `lrq run` trains files or synthetic data; use submit",
        {"data": {"dataset": "abc", "target": "Y"}},
    ),
    case("path-without-target", "data.target: required with path", {"data": {"path": "good.csv"}}),
    RunCase(
        "unknown-feature",
        "good.csv: no column 'Q' (a feature); columns: X1, X2, Y",
        file_spec("good.csv", features=["X1", "Q"]),
    ),
    RunCase(
        "target-as-feature",
        "data.features: the target 'Y' cannot be a feature",
        file_spec("good.csv", features=["X1", "Y"]),
    ),
    *[RunCase(f"data-{fault.id}", fault.expected, make=fault.make) for fault in DATA_FAULTS],
]


@pytest.fixture
def run_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> dict[str, Path]:
    """`lrq run` settings whose database and broker would show any write (there must be none)."""
    dirs = {name: tmp_path / name for name in ("home", "data", "outside")}
    for name in ("data", "outside"):
        dirs[name].mkdir()
    dirs["specs"] = dirs["data"]  # a relative data.path is taken from the spec's directory
    (dirs["data"] / "good.csv").write_bytes(GOOD_CSV)
    monkeypatch.setenv("LRQ_HOME", str(dirs["home"]))
    monkeypatch.setenv("LRQ_DATABASE_URL", f"sqlite:///{dirs['home'] / 'lrq.db'}")
    monkeypatch.setenv("LRQ_BROKER_URL", "redis://127.0.0.1:9/0")
    monkeypatch.setenv("LRQ_DATA_DIR", str(dirs["data"]))
    for key, value in LIMITS.items():
        monkeypatch.setenv(key, value)
    return dirs


def tree(root: Path) -> dict[str, bytes | None]:
    return {
        str(p.relative_to(root)): None if p.is_dir() or p.is_symlink() else p.read_bytes()
        for p in sorted(root.rglob("*"))
    }


def test_the_base_spec_and_a_good_file_run(run_env: dict[str, Path]) -> None:
    """The control: every refusal below is caused by its one change."""
    path = run_env["specs"] / "spec.yaml"
    path.write_bytes(dump(BASE))
    result = run_cli("run", str(path), "--json")
    assert result.exit_code == 0, result.output
    path.write_bytes(dump(file_spec("good.csv", features=["X1", "X2"])))
    result = run_cli("run", str(path), "--json")
    assert result.exit_code == 0, result.output
    assert not run_env["home"].exists()


def test_run_cases_are_many() -> None:
    assert len(RUN_CASES) >= 25
    assert len({c.id for c in RUN_CASES}) == len(RUN_CASES)


@pytest.mark.parametrize("bad", RUN_CASES, ids=[c.id for c in RUN_CASES])
def test_run_refuses_bad_input(run_env: dict[str, Path], bad: RunCase) -> None:
    document = bad.document
    if bad.make is not None:
        document = file_spec(bad.make(run_env["data"], run_env["outside"]))
    spec_path = run_env["specs"] / "spec.yaml"
    spec_path.write_bytes(bad.raw if bad.raw is not None else dump(document))
    before = tree(run_env["data"])

    result = run_cli("run", str(spec_path), *bad.args)

    assert result.exit_code == 2, result.output
    assert result.stdout == ""
    assert result.stderr.startswith("error: "), result.stderr
    assert bad.expected in result.stderr
    assert "Traceback" not in result.output
    assert tree(run_env["data"]) == before
    assert not run_env["home"].exists()


def test_run_of_a_missing_spec_file(run_env: dict[str, Path]) -> None:
    result = run_cli("run", str(run_env["specs"] / "absent.yaml"))
    assert result.exit_code == 2
    assert "absent.yaml: cannot read (No such file or directory)" in result.stderr


# -- submit and datasets add against a real database and Redis --------------------------------


@dataclass
class Service:
    """A database and a Redis already holding a dataset, a job and a sweep."""

    url: str
    redis: Any
    data: Path
    outside: Path
    specs: Path

    def state(self) -> dict[str, int]:
        return state_counts(self.url, self.redis)

    def spec(self, raw: bytes) -> Path:
        path = self.specs / "spec.yaml"
        path.write_bytes(raw)
        return path


@pytest.fixture(scope="module")
def sqlite_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An upgraded SQLite file, copied for each test (migrating each time is slow)."""
    from service import db

    path = tmp_path_factory.mktemp("template") / "lrq.db"
    db.upgrade(f"sqlite:///{path}")
    db.dispose_all()
    return path


def start_service(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, url: str, redis_url: str
) -> Service:
    import redis

    dirs = {name: tmp_path / name for name in ("home", "data", "outside")}
    for path in dirs.values():
        path.mkdir(exist_ok=True)
    dirs["specs"] = dirs["data"]  # a relative data.path is taken from the spec's directory
    (dirs["data"] / "good.csv").write_bytes(GOOD_CSV)
    env = {
        "LRQ_HOME": str(dirs["home"]),
        "LRQ_DATABASE_URL": url,
        "LRQ_BROKER_URL": redis_url,
        "LRQ_DATA_DIR": str(dirs["data"]),
        "LRQ_BROKER_TIMEOUT": "2",
        **LIMITS,
    }
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    service = Service(
        url, redis.Redis.from_url(redis_url), dirs["data"], dirs["outside"], dirs["specs"]
    )
    base = service.specs / "base.yaml"
    base.write_bytes(dump(BASE))
    for args in (
        ("datasets", "add", "good.csv", "--target", "Y"),
        ("submit", str(base)),
        ("submit", str(base), "--grid", "epochs=2,3"),
    ):
        result = run_cli(*args)
        assert result.exit_code == 0, result.output
    # Three jobs, two messages: the packing sweep's two travel as one pack's message.
    assert service.state() | {"redis keys": 0} == {
        "jobs": 3, "sweeps": 1, "datasets": 1, "epochs": 0,
        "redis cpu": 2, "redis gpu": 0, "redis unacked": 0, "redis keys": 0,
    }  # fmt: skip
    return service


@pytest.fixture
def sqlite_service(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, redis_url: str, sqlite_template: Path
) -> Service:
    shutil.copy(sqlite_template, tmp_path / "lrq.db")
    return start_service(monkeypatch, tmp_path, f"sqlite:///{tmp_path / 'lrq.db'}", redis_url)


@pytest.fixture
def pg_service(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, redis_url: str, pg_url: str
) -> Iterator[Service]:
    from service import db

    db.upgrade(pg_url)
    db.dispose_all()
    yield start_service(monkeypatch, tmp_path, pg_url, redis_url)
    db.dispose_all()


def assert_refused(service: Service, args: list[str], expected: str) -> None:
    before = service.state()
    result = run_cli(*args)
    assert result.exit_code == 2, result.output
    assert result.stderr.startswith("error: "), result.stderr
    assert expected in result.stderr, result.stderr
    assert "Traceback" not in result.output
    assert result.stdout == ""
    assert service.state() == before


# -- the property: mutated specs ----------------------------------------------------------------


@dataclass(frozen=True)
class Mutation:
    """A bad spec file and options, and the text its refusal must contain."""

    label: str
    raw: bytes
    expected: str
    args: tuple[str, ...] = ()
    document: dict[str, Any] | None = None


INT_FIELDS = {  # path: the smallest valid value
    "epochs": 1,
    "batch_size": 1,
    "eval_every": 1,
    "seed": 0,
    "data.synthetic.n_samples": 2,
    "data.synthetic.n_features": 1,
    "data.synthetic.seed": 0,
}
FLOAT_FIELDS = {  # path: True where 0 itself is refused
    "optimizer.lr": True,
    "optimizer.momentum": False,
    "optimizer.dampening": False,
    "optimizer.weight_decay": False,
    "data.synthetic.noise_std": False,
    "data.test.fraction": True,
}
UNBOUNDED_FLOATS = ("data.synthetic.intercept",)
BOOL_FIELDS = ("shuffle", "optimizer.nesterov", "model.fit_intercept")
CHOICE_FIELDS = {
    "backend": {"torch", "numpy"},
    "device": {"cpu", "cuda", "auto"},
    "dtype": {"float32", "float64"},
    "loss.reduction": {"sum", "mean"},
    "data.synthetic.generator": {"numpy", "torch"},
}
SECTIONS = ("data", "data.synthetic", "data.test", "model", "loss", "optimizer")
#: Words pydantic reads as booleans: a bool field accepts them.
BOOL_WORDS = {"0", "off", "f", "false", "n", "no", "1", "on", "t", "true", "y", "yes"}


def known_fields(path: str) -> set[str]:
    from pydantic import BaseModel

    from service import spec

    models: dict[str, type[BaseModel]] = {
        "": spec.JobSpec,
        "data": spec.DataSpec,
        "data.synthetic": spec.SyntheticData,
        "data.test": spec.TestSet,
        "model": spec.ModelSpec,
        "loss": spec.LossSpec,
        "optimizer": spec.OptimizerSpec,
        "model.init": spec.ExplicitInit,
    }
    return set(models[path].model_fields)


letters = st.text(alphabet=string.ascii_letters, min_size=1, max_size=8)
small_ints = st.integers(-5, 5)
junk_lists = st.lists(small_ints | letters, max_size=3)
junk_dicts = st.dictionaries(letters, small_ints, max_size=2)
finite_floats = st.floats(allow_nan=False, allow_infinity=False)
numbers = st.integers(-(10**6), 10**6) | finite_floats
not_a_number = letters | junk_lists | junk_dicts | st.booleans()


def doc_mutation(label: str, changes: dict[str, Any], expected: str) -> Mutation:
    document = changed(changes)
    return Mutation(label, dump(document), expected, document=document)


@st.composite
def wrong_types(draw: st.DrawFn) -> Mutation:
    kind = draw(st.sampled_from(["int", "float", "bool", "choice", "name", "tags", "section"]))
    value: Any
    if kind == "int":
        path = draw(st.sampled_from(sorted(INT_FIELDS)))
        value = draw(not_a_number | finite_floats.filter(lambda v: not v.is_integer()))
    elif kind == "float":
        path = draw(st.sampled_from(sorted(FLOAT_FIELDS) + list(UNBOUNDED_FLOATS)))
        value = draw(not_a_number)
    elif kind == "bool":
        path = draw(st.sampled_from(BOOL_FIELDS))
        value = draw(
            junk_lists
            | junk_dicts
            | letters.filter(lambda s: s.lower() not in BOOL_WORDS)
            | st.integers().filter(lambda v: v not in (0, 1))
            | finite_floats.filter(lambda v: v not in (0.0, 1.0))
        )
    elif kind == "choice":
        path = draw(st.sampled_from(sorted(CHOICE_FIELDS)))
        allowed = CHOICE_FIELDS[path]
        value = draw(
            letters.filter(lambda s: s not in allowed) | numbers | junk_lists | st.booleans()
        )
    elif kind == "name":
        path = "name"
        value = draw(
            numbers | junk_lists | junk_dicts | st.booleans() | st.just("")
            | st.text(alphabet=string.ascii_letters, min_size=201, max_size=260)
        )  # fmt: skip
    elif kind == "tags":
        path = "tags"
        value = draw(
            numbers | letters | junk_dicts | st.booleans()
            | st.lists(numbers, min_size=1, max_size=3)
            | st.lists(letters, min_size=51, max_size=55)
        )  # fmt: skip
    else:
        path = draw(st.sampled_from(SECTIONS))
        value = draw(numbers | letters | junk_lists | st.booleans())
    return doc_mutation(f"wrong type {path}={value!r}", {path: value}, path)


@st.composite
def bad_sizes(draw: st.DrawFn) -> Mutation:
    if draw(st.booleans()):
        path = draw(st.sampled_from(sorted(INT_FIELDS)))
        value: float = draw(st.integers(-(10**12), INT_FIELDS[path] - 1))
    else:
        path = draw(st.sampled_from(sorted(FLOAT_FIELDS)))
        if FLOAT_FIELDS[path]:
            value = draw(st.floats(max_value=0.0, allow_nan=False, allow_infinity=False))
        else:
            # Not a filter on v < 0: hypothesis rewrites that into a bound that lets -0.0 in.
            value = draw(st.floats(max_value=-5e-324, allow_nan=False, allow_infinity=False))
    return doc_mutation(f"size {path}={value!r}", {path: value}, f"{path}: must be")


@st.composite
def non_finite(draw: st.DrawFn) -> Mutation:
    value = draw(st.sampled_from([math.nan, math.inf, -math.inf]))
    where = draw(st.sampled_from(["field", "coefficient", "weight"]))
    changes: dict[str, Any]
    if where == "coefficient":
        index = draw(st.integers(0, 1))
        coefficients: list[float] = [1.0, 2.0]
        coefficients[index] = value
        changes = {"data.synthetic.coefficients": coefficients}
        path = f"data.synthetic.coefficients[{index}]"
    elif where == "weight":
        index = draw(st.integers(0, 1))
        weights: list[float] = [0.5, 1.0]
        weights[index] = value
        changes = {"model.init": {"weights": weights, "bias": 0.0}}
        path = f"model.init.weights[{index}]"
    else:
        path = draw(
            st.sampled_from(
                sorted(INT_FIELDS) + sorted(FLOAT_FIELDS) + ["data.synthetic.intercept"]
            )
        )
        changes = {path: value}
    return doc_mutation(f"non-finite {path}={value!r}", changes, f"{path}: must be")


@st.composite
def huge_values(draw: st.DrawFn) -> Mutation:
    kind = draw(
        st.sampled_from(
            [
                "epochs", "rows", "features", "seed", "batch", "fraction", "row-epochs",
                "steps", "magnitude", "eval-every",
            ]
        )
    )  # fmt: skip
    big = 10**30
    if kind == "magnitude":
        # Data drawn with these would overflow: refused however the value is written.
        where = draw(st.sampled_from(["coefficients", "intercept", "noise_std"]))
        size = draw(st.floats(min_value=1.0000001e9, max_value=1.7e308))
        sign = -1 if where != "noise_std" and draw(st.booleans()) else 1
        value = sign * size
        bound = ">= -1e+09" if sign < 0 else "<= 1e+09"
        if where == "coefficients":
            return doc_mutation(
                f"coefficient {value!r}",
                {"data.synthetic.coefficients": [1.0, value]},
                f"data.synthetic.coefficients[1]: must be {bound}",
            )
        path = f"data.synthetic.{where}"
        return doc_mutation(f"{where}={value!r}", {path: value}, f"{path}: must be {bound}")
    if kind == "eval-every":
        value = draw(st.integers(10**9 + 1, 10**400))
        return doc_mutation(
            f"eval_every={value}", {"eval_every": value}, "eval_every: must be <= 1000000000"
        )
    if kind == "epochs":
        value = draw(st.integers(1001, big))
        return doc_mutation(f"epochs={value}", {"epochs": value}, f"epochs: {value}, more than")
    if kind == "rows":
        value = draw(st.integers(100_001, big))
        return doc_mutation(
            f"n_samples={value}",
            {"data.synthetic.n_samples": value},
            f"data.synthetic.n_samples: {value} rows, more than the limit of 100000",
        )
    if kind == "features":
        value = draw(st.integers(51, big))
        return doc_mutation(
            f"n_features={value}",
            {"data.synthetic.n_features": value, "data.synthetic.coefficients": DELETE},
            f"data.synthetic.n_features: {value} features, more than the limit of 50",
        )
    if kind == "seed":
        path = draw(st.sampled_from(["seed", "data.synthetic.seed"]))
        value = draw(st.integers(2**32, big))
        return doc_mutation(f"{path}={value}", {path: value}, f"{path}: must be < 4294967296")
    if kind == "batch":
        value = draw(st.integers(31, big))
        return doc_mutation(
            f"batch_size={value}",
            {"batch_size": value},
            f"batch_size: {value} is more than the 30 training rows",
        )
    if kind == "fraction":
        fraction = draw(st.floats(min_value=1.0, allow_nan=False, allow_infinity=False))
        return doc_mutation(
            f"fraction={fraction}",
            {"data.test.fraction": fraction},
            "data.test.fraction: must be < 1",
        )
    if kind == "steps":
        # Inside the row x epoch budget (200 rows x 1000 epochs) but not the step budget.
        epochs = draw(st.integers(667, 1000))
        return doc_mutation(
            f"{epochs} epochs of batch_size 1",
            {"data.synthetic.n_samples": 200, "epochs": epochs, "batch_size": 1},
            f"batch_size: {epochs} epochs x 150 steps each (batch_size 1 of 150 training rows) "
            f"is {epochs * 150} optimizer steps, more than the limit of 100000",
        )
    epochs = draw(st.integers(501, 1000))
    return doc_mutation(
        f"2000 rows x {epochs} epochs",
        {"data.synthetic.n_samples": 2000, "epochs": epochs},
        f"epochs: 2000 rows x {epochs} epochs, more than the limit of 1000000",
    )


identifiers = st.from_regex(r"[A-Za-z_][A-Za-z0-9_]{0,11}", fullmatch=True)


@st.composite
def unknown_keys(draw: st.DrawFn) -> Mutation:
    where = draw(st.sampled_from(["", *SECTIONS, "model.init"]))
    known = known_fields(where)
    key = draw(identifiers.filter(lambda k: k not in known))
    value = draw(small_ints | letters | st.none())
    changes: dict[str, Any]
    if where == "model.init":
        changes = {"model.init": {"weights": [0.5, 1.0], "bias": 0.0, key: value}}
    else:
        changes = {f"{where}.{key}" if where else key: value}
    path = f"{where}.{key}" if where else key
    return doc_mutation(f"unknown {path}", changes, f"{path}: unknown field")


GRID_SYNTAX = [
    (("--grid", "epochs"), "--grid 'epochs': expected key.path=value"),
    (("--grid", "=1,2"), "--grid '=1,2': expected key.path=value"),
    (("--grid", "epochs="), "--grid epochs: empty value in ''"),
    (("--grid", "epochs=1,,2"), "--grid epochs: empty value in '1,,2'"),
    (("--grid", "epochs=1,2", "--grid", "epochs=3"), "--grid epochs: given twice"),
    (("--grid", "epochs.x=1,2"), "--grid epochs.x: epochs is not a mapping"),
    (("--grid", "name=" + "[" * 20 + "]" * 20), "--grid name: nested too deeply"),
    (("--set", "epochs"), "--set 'epochs': expected key.path=value"),
    (("--set", "data.synthetic.seed.x=1"), "--set data.synthetic.seed.x: data.synthetic.seed is"),
]


@st.composite
def bad_grids(draw: st.DrawFn) -> Mutation:
    kind = draw(st.sampled_from(["syntax", "point", "unknown", "too-many"]))
    if kind == "syntax":
        args, expected = draw(st.sampled_from(GRID_SYNTAX))
    elif kind == "point":
        path = draw(st.sampled_from(["epochs", "batch_size", "eval_every"]))
        values = [str(v) for v in draw(st.lists(st.integers(1, 30), min_size=1, max_size=3))]
        bad = draw(st.integers(-1000, 0))
        values.insert(draw(st.integers(0, len(values))), str(bad))
        args = ("--grid", f"{path}={','.join(values)}")
        expected = f"{path}: must be > 0, got {bad}"
    elif kind == "unknown":
        section = draw(st.sampled_from(["optimizer", "loss", "data.synthetic"]))
        key = draw(identifiers.filter(lambda k: k not in known_fields(section)))
        args = ("--grid", f"{section}.{key}=1,2")
        expected = f"{section}.{key}: unknown field"
    else:
        a, b = draw(
            st.tuples(st.integers(2, 12), st.integers(2, 12)).filter(lambda ab: ab[0] * ab[1] > 20)
        )
        args = (
            "--grid", "epochs=" + ",".join(str(i) for i in range(1, a + 1)),
            "--grid", "seed=" + ",".join(str(i) for i in range(b)),
        )  # fmt: skip
        expected = f"--grid: {a * b} points, more than the limit of 20"
    return Mutation(f"grid {args}", dump(BASE), expected, args=args, document=BASE)


@st.composite
def bad_files(draw: st.DrawFn) -> Mutation:
    kind = draw(st.sampled_from(["deep", "very-deep", "aliases", "not-utf8", "empty", "comment"]))
    if kind == "deep":
        where = draw(st.sampled_from(["name", "data.synthetic.deep", "optimizer.lr", "tags"]))
        levels = draw(st.integers(17, 120))
        return doc_mutation(
            f"{levels} levels at {where}", {where: nested(levels)}, "spec.yaml: nested too deeply"
        )
    if kind == "very-deep":
        levels = draw(st.integers(17, 30_000))
        return Mutation(
            f"{levels} brackets",
            b"name: " + b"[" * levels + b"]" * levels,
            "spec.yaml: nested too deeply",
        )
    if kind == "aliases":
        levels = draw(st.integers(8, 14))
        return Mutation(f"alias bomb {levels}", alias_bomb(levels), "spec.yaml: more than")
    if kind == "not-utf8":
        text = dump(BASE)
        position = draw(st.integers(0, len(text)))
        bad = draw(
            st.sampled_from(
                [
                    b"\xff",
                    b"\xfe",
                    b"\x80",
                    b"\xc3\x28",
                    b"\xc0\xaf",
                    b"\xed\xa0\x80",
                    b"\xf4\x90\x80\x80",
                ]
            )
        )
        raw = text[:position] + bad + text[position:]
        return Mutation(
            f"{bad!r} at {position}", raw, f"spec.yaml: not UTF-8 text (byte {position})"
        )
    if kind == "empty":
        raw = draw(st.text(alphabet=" \t\r\n", max_size=20)).encode()
        return Mutation(f"blank {raw!r}", raw, "spec.yaml: empty")
    return Mutation(
        "only a comment",
        b"# nothing here\n",
        "spec.yaml: must be a mapping of fields, got NoneType",
    )


mutations = st.one_of(
    wrong_types(), bad_sizes(), non_finite(), huge_values(), unknown_keys(), bad_grids(),
    bad_files(),
)  # fmt: skip


def same(a: Any, b: Any) -> bool:
    """Equality in which NaN equals NaN."""
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
    return type(a) is type(b) and a == b


def check_refused(service: Service, mutation: Mutation) -> None:
    if mutation.document is not None:
        # The file holds exactly the mutated document, so the expectation is about it.
        assert same(yaml.safe_load(mutation.raw), mutation.document), mutation.label
    path = service.spec(mutation.raw)
    assert_refused(service, ["submit", str(path), *mutation.args], mutation.expected)


PROPERTY = settings(
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


@settings(PROPERTY, max_examples=60)
@given(mutation=mutations)
def test_mutated_specs_are_refused_and_change_nothing(
    sqlite_service: Service, mutation: Mutation
) -> None:
    check_refused(sqlite_service, mutation)


@settings(PROPERTY, max_examples=15)
@given(mutation=mutations)
def test_mutated_specs_are_refused_on_postgresql(pg_service: Service, mutation: Mutation) -> None:
    check_refused(pg_service, mutation)


def test_the_unmutated_spec_is_accepted(sqlite_service: Service) -> None:
    """The control for the property: the base spec, written the same way, is queued."""
    before = sqlite_service.state()
    result = run_cli("submit", str(sqlite_service.spec(dump(BASE))))
    assert result.exit_code == 0, result.output
    after = sqlite_service.state()
    assert (after["jobs"], after["redis cpu"]) == (before["jobs"] + 1, before["redis cpu"] + 1)


# -- data files through submit and datasets add ------------------------------------------------


@pytest.mark.parametrize("command", ["submit", "datasets-add"])
@pytest.mark.parametrize("fault", DATA_FAULTS, ids=[f.id for f in DATA_FAULTS])
def test_bad_data_files_are_refused_and_change_nothing(
    sqlite_service: Service, fault: DataFault, command: str
) -> None:
    path = fault.make(sqlite_service.data, sqlite_service.outside)
    if command == "submit":
        args = ["submit", str(sqlite_service.spec(dump(file_spec(path))))]
    else:
        args = ["datasets", "add", path, "--target", "Y"]
    assert_refused(sqlite_service, args, fault.expected)


@pytest.mark.parametrize(
    ("changes", "options", "expected"),
    [
        ({"features": ["X1", "Q"]}, ["--features", "X1,Q"], "good.csv: no column 'Q' (a feature)"),
        ({"target": "Z"}, ["--target", "Z"], "good.csv: no column 'Z' (the target)"),
    ],
)
def test_bad_columns_are_named(
    sqlite_service: Service, changes: dict[str, Any], options: list[str], expected: str
) -> None:
    spec = file_spec("good.csv")
    spec["data"].update(changes)
    assert_refused(sqlite_service, ["submit", str(sqlite_service.spec(dump(spec)))], expected)
    target = [] if "--target" in options else ["--target", "Y"]
    assert_refused(sqlite_service, ["datasets", "add", "good.csv", *target, *options], expected)


def test_a_sweep_with_one_bad_file_point_records_nothing(sqlite_service: Service) -> None:
    """A file is registered inside the submit's transaction; a later refusal rolls it back."""
    (sqlite_service.data / "other.csv").write_bytes(GOOD_CSV.replace(b"15", b"16"))
    spec = file_spec("other.csv")
    assert_refused(
        sqlite_service,
        ["submit", str(sqlite_service.spec(dump(spec))), "--grid", "batch_size=2,7"],
        "batch_size: 7 is more than the 6 training rows",
    )


@pytest.mark.parametrize(
    ("changes", "expected"),
    [
        ({"data": {"dataset": "no-such-dataset", "target": "Y"}}, "no-such-dataset"),
        ({"data": {"dataset": "good.csv", "target": "Z"}}, "data.target: dataset 'good.csv'"),
        ({"data": {"dataset": "good.csv", "features": ["Q"]}}, "data.features: 'Q'"),
        (
            {
                "data": {"dataset": "good.csv"},
                "model.init": {"weights": [1], "bias": 0},
                "batch_size": DELETE,
            },
            "model.init.weights: expected 2 values (the features), got 1",
        ),
        (
            {"data": {"dataset": "good.csv"}, "batch_size": 7},
            "batch_size: 7 is more than the 6 training rows",
        ),
    ],
)
def test_bad_references_to_a_registered_dataset(
    sqlite_service: Service, changes: dict[str, Any], expected: str
) -> None:
    spec = changed(changes)
    assert_refused(sqlite_service, ["submit", str(sqlite_service.spec(dump(spec)))], expected)


# -- names that look like SQL ------------------------------------------------------------------

SQL_NAMES = [
    "'); DROP TABLE jobs;--",
    'Robert"); DROP TABLE sweeps; --',
    "x' OR '1'='1",
    "%_\\'; DELETE FROM datasets; --",
]


@pytest.mark.parametrize("database", ["sqlite", "postgresql"])
def test_sql_looking_names_and_tags_are_stored_literally(
    database: str, request: pytest.FixtureRequest
) -> None:
    service: Service = request.getfixturevalue(
        f"{'pg' if database == 'postgresql' else 'sqlite'}_service"
    )
    from sqlalchemy import inspect

    from service import db, jobs

    name = SQL_NAMES[0]
    spec = changed({"tags": SQL_NAMES})
    path = service.spec(dump(spec))
    result = run_cli("submit", str(path), "--set", f"name={name}", "-q")
    assert result.exit_code == 0, result.output
    (job_id,) = result.stdout.split()
    swept = run_cli("submit", str(path), "--set", f"name={SQL_NAMES[1]}", "--grid", "epochs=2,3")
    assert swept.exit_code == 0, swept.output
    (service.data / "sql.csv").write_bytes(GOOD_CSV.replace(b"15", b"16"))
    added = run_cli("datasets", "add", "sql.csv", "--target", "Y", "--name", SQL_NAMES[3])
    assert added.exit_code == 0, added.output
    by_name = changed({"data": {"dataset": SQL_NAMES[3]}, "batch_size": DELETE})
    on_it = run_cli("submit", str(service.spec(dump(by_name))), "-q")
    assert on_it.exit_code == 0, on_it.output

    listed = run_cli("status", "--format", "json", "--name", name)
    assert listed.exit_code == 0, listed.output
    rows = json.loads(listed.stdout)
    assert [(row["id"], row["name"]) for row in rows] == [(job_id, name)]
    every = json.loads(run_cli("status", "--format", "json").stdout)
    assert sorted(row["name"] for row in every) == sorted(
        [
            "base",
            "base",
            "base[epochs=2]",
            "base[epochs=3]",
            name,
            f"{SQL_NAMES[1]}[epochs=2]",
            f"{SQL_NAMES[1]}[epochs=3]",
        ]
    )
    names = json.loads(run_cli("datasets", "list", "--format", "json").stdout)
    assert SQL_NAMES[3] in [row["name"] for row in names]

    with db.transaction(service.url) as session:
        (job,) = jobs.find_jobs(session=session, ids=[job_id])
        assert job.name == name
        assert job.spec["name"] == name
        assert job.spec["tags"] == SQL_NAMES
    tables = set(inspect(db.get_engine(service.url)).get_table_names())
    assert {"jobs", "sweeps", "datasets", "epochs"} <= tables
    db.dispose_all()
    # Seven jobs, five messages: each two-point packing sweep travels as one message.
    assert service.state() | {"redis keys": 0} == {
        "jobs": 7, "sweeps": 2, "datasets": 2, "epochs": 0,
        "redis cpu": 5, "redis gpu": 0, "redis unacked": 0, "redis keys": 0,
    }  # fmt: skip


# -- spec files that are not files, settings, names the database would refuse -----------------

LONG = "n" * 300


def cli_process(env: dict[str, str], *args: str, timeout: float = 60) -> Any:
    """`lrq ARGS` as its own process, its memory capped: a runaway read fails, not the host."""
    import resource
    import subprocess
    import sys

    def cap() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (3 * 2**30, 3 * 2**30))

    return subprocess.run(
        [sys.executable, "-m", "service.cli", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        preexec_fn=cap,
        check=False,
    )


@pytest.mark.parametrize("command", ["submit", "run"])
@pytest.mark.parametrize("kind", ["dev-zero", "fifo", "directory"])
def test_a_spec_path_that_is_not_a_regular_file_is_refused_without_reading_it(
    sqlite_service: Service, command: str, kind: str
) -> None:
    if kind == "dev-zero":
        path = "/dev/zero"
    elif kind == "fifo":
        path = str(sqlite_service.outside / "spec.fifo")
        os.mkfifo(path)  # nobody writes to it: reading would wait forever
    else:
        path = str(sqlite_service.outside)
    before = sqlite_service.state()
    done = cli_process(dict(os.environ), command, path)
    assert done.returncode == 2, done.stderr
    expected = "cannot read (Is a directory)" if kind == "directory" else "not a regular file"
    assert done.stderr == f"error: {path}: {expected}\n"
    assert done.stdout == ""
    assert sqlite_service.state() == before


def test_a_spec_file_over_the_size_limit_is_refused(sqlite_service: Service) -> None:
    from service.spec import MAX_SPEC_BYTES

    raw = dump(BASE) + b"#" * MAX_SPEC_BYTES
    path = sqlite_service.spec(raw)
    assert_refused(sqlite_service, ["submit", str(path)], f"larger than {MAX_SPEC_BYTES} bytes")


def pg_form(url: str, scheme: str) -> str:
    from sqlalchemy.engine import make_url

    rendered = make_url(url).render_as_string(hide_password=False)
    return scheme + "://" + rendered.partition("://")[2]


BAD_SETTINGS = [
    ("LRQ_DATABASE_URL", "mysql://lrq:pw@127.0.0.1/lrq", "LRQ_DATABASE_URL: 'mysql' databases"),
    ("LRQ_DATABASE_URL", "not a url at all", "LRQ_DATABASE_URL: not a database URL; expected"),
    (
        "LRQ_DATABASE_URL",
        "postgresql+psycopg2://u@h/db",
        "LRQ_DATABASE_URL: 'postgresql+psycopg2' databases",
    ),
    (
        "LRQ_DATABASE_URL",
        "postgresql+psycopg://lrq:change-me@127.0.0.1/lrq",
        "LRQ_DATABASE_URL: the password is the placeholder 'change-me'",
    ),
    ("LRQ_BROKER_URL", "amqp://guest@127.0.0.1//", "LRQ_BROKER_URL: 'amqp' brokers are not"),
    ("LRQ_BROKER_URL", "redis://h:port/0", "LRQ_BROKER_URL: not a broker URL"),
    (
        "LRQ_BROKER_URL",
        "redis://:change-me@127.0.0.1:6379/0",
        "LRQ_BROKER_URL: the password is the placeholder 'change-me'",
    ),
    ("LRQ_MAX_ROWS", "abc", "LRQ_MAX_ROWS: input should be a valid integer"),
    ("LRQ_MAX_ROWS", "0", "LRQ_MAX_ROWS: input should be greater than 0, got '0'"),
    ("LRQ_LEASE_SECONDS", "soon", "LRQ_LEASE_SECONDS: input should be a valid number"),
    ("LRQ_TASK_EVENTS", "maybe", "LRQ_TASK_EVENTS: input should be a valid boolean"),
]


@pytest.mark.parametrize("command", [["submit", "base.yaml"], ["status"], ["info"]])
@pytest.mark.parametrize(
    ("variable", "value", "expected"), BAD_SETTINGS, ids=[f"{v}={x}" for v, x, _ in BAD_SETTINGS]
)
def test_a_bad_setting_is_one_line_naming_the_variable(
    sqlite_service: Service,
    monkeypatch: pytest.MonkeyPatch,
    command: list[str],
    variable: str,
    value: str,
    expected: str,
) -> None:
    args = [str(sqlite_service.specs / a) if a.endswith(".yaml") else a for a in command]
    before = sqlite_service.state()
    monkeypatch.setenv(variable, value)
    result = run_cli(*args)
    assert result.exit_code == 2, result.output
    assert result.stdout == ""
    [line] = result.stderr.splitlines()
    assert line.startswith(f"error: {expected}"), line
    assert ":pw@" not in line  # a password in a refused URL is not printed
    assert sqlite_service.state() == before


@pytest.mark.parametrize("scheme", ["postgres", "postgresql"])
def test_postgres_urls_as_people_paste_them_mean_psycopg(
    pg_service: Service, monkeypatch: pytest.MonkeyPatch, scheme: str
) -> None:
    before = pg_service.state()
    monkeypatch.setenv("LRQ_DATABASE_URL", pg_form(pg_service.url, scheme))
    result = run_cli("submit", str(pg_service.specs / "base.yaml"), "-q")
    assert result.exit_code == 0, result.output
    info = run_cli("info")
    assert info.stdout.splitlines()[0].startswith("database  postgresql+psycopg://")
    after = pg_service.state()
    assert (after["jobs"], after["redis cpu"]) == (before["jobs"] + 1, before["redis cpu"] + 1)


@pytest.mark.parametrize("database", ["sqlite", "postgresql"])
@pytest.mark.parametrize(
    ("command", "expected"),
    [
        (["results", "{id}", "-o", "{missing}/out.csv"], "-o {missing}/out.csv: no directory"),
        (["results", "{id}", "--history", "-o", "{missing}/h.json"], "-o {missing}/h.json: no dir"),
        (["plot", "{id}", "-o", "{missing}/losses.png"], "-o {missing}/losses.png: no directory"),
        (
            ["plot", "{id}", "-o", "{here}/losses.txt"],
            "-o {here}/losses.txt: unsupported format '.txt'; use .png",
        ),
        (["plot", "{id}", "-o", "{here}/losses"], "-o {here}/losses: unsupported format '(none)'"),
    ],
)
def test_output_files_lrq_cannot_write_are_refused_before_any_work(
    database: str,
    request: pytest.FixtureRequest,
    command: list[str],
    expected: str,
) -> None:
    service: Service = request.getfixturevalue(
        f"{'pg' if database == 'postgresql' else 'sqlite'}_service"
    )
    job_id = run_cli("status", "--format", "json").stdout
    values = {
        "id": json.loads(job_id)[0]["id"],
        "missing": str(service.outside / "no-such-dir"),
        "here": str(service.outside),
    }
    before = sorted(p.name for p in service.outside.iterdir())
    assert_refused(
        service, [a.format(**values) for a in command], "error: " + expected.format(**values)
    )
    assert sorted(p.name for p in service.outside.iterdir()) == before


def long_named_file(service: Service) -> str:
    name = "d" * 230 + ".csv"
    (service.data / name).write_bytes(GOOD_CSV)
    return name


def long_column_file(service: Service) -> str:
    (service.data / "wide.csv").write_bytes(
        GOOD_CSV.replace(b",Y\n", b"," + LONG.encode() + b"\n", 1)
    )
    return "wide.csv"


#: (datasets add arguments, the message); every one fits SQLite and PostgreSQL alike.
DATASET_REFUSALS: list[tuple[Callable[[Service], list[str]], str]] = [
    (
        lambda s: ["good.csv", "--target", "Y", "--name", "\udcff"],
        "--name '\\udcff': not valid UTF-8",
    ),
    (
        lambda s: ["good.csv", "--target", "Y", "--name", "a\x00b"],
        "--name 'a\\x00b': must not contain a NUL",
    ),
    (lambda s: ["good.csv", "--target", "Y", "--name", LONG], "--name 'nnn"),
    (lambda s: ["good.csv", "--target", "Y", "--name", ""], "--name '': must not be empty"),
    (
        lambda s: ["good.csv", "--target", "Y", "--features", "X1,X1"],
        "--features: 'X1' is given twice",
    ),
    (
        lambda s: ["good.csv", "--target", "Y", "--features", "X1,,X2"],
        "--features '': must not be empty",
    ),
    (lambda s: ["good.csv", "--target", "Y\x00"], "--target 'Y\\x00': must not contain a NUL"),
    (lambda s: ["good.csv", "--target", "\ud800"], "--target '\\ud800': not valid UTF-8"),
    (lambda s: [long_column_file(s), "--target", LONG], "--target 'nnn"),
    (lambda s: [long_column_file(s), "--target", "X1"], "wide.csv: column 'nnn"),
    (
        lambda s: [long_named_file(s), "--target", "Y"],
        "the file name (the default --name) 'ddd",
    ),
]


@pytest.mark.parametrize("database", ["sqlite", "postgresql"])
@pytest.mark.parametrize(("make", "expected"), DATASET_REFUSALS, ids=range(len(DATASET_REFUSALS)))
def test_dataset_names_the_database_would_refuse_are_refused_naming_the_option(
    database: str,
    request: pytest.FixtureRequest,
    make: Callable[[Service], list[str]],
    expected: str,
) -> None:
    service: Service = request.getfixturevalue(
        f"{'pg' if database == 'postgresql' else 'sqlite'}_service"
    )
    assert_refused(service, ["datasets", "add", *make(service)], f"error: {expected}")
    if "nnn" in expected or "ddd" in expected:
        result = run_cli("datasets", "add", *make(service))
        assert "more than 200" in result.stderr


SUBMIT_REFUSALS = [
    ({"name": "a\x00b"}, [], "name: must not contain a NUL character"),
    ({"tags": ["x", "y\x00"]}, [], "tags[1]: must not contain a NUL character"),
    ({"name": LONG}, [], "name: string should have at most 200 characters"),
    ({}, ["--queue", "q" * 100], "--queue: 100 characters, more than 64"),
    ({}, ["--queue", "gpu\x00"], "--queue: 'gpu\\x00' is not a queue name"),
    ({}, ["--set", "name=x\x00"], "name: must not contain a NUL character"),
    ({"data": {"dataset": "good.csv", "target": "Y" * 300}}, [], "data.target: string should"),
    ({"data": {"dataset": "d" * 300}}, [], "data.dataset: string should have at most 200"),
]


@pytest.mark.parametrize("database", ["sqlite", "postgresql"])
@pytest.mark.parametrize(
    ("changes", "args", "expected"), SUBMIT_REFUSALS, ids=range(len(SUBMIT_REFUSALS))
)
def test_spec_text_the_database_would_refuse_is_refused_naming_the_field(
    database: str,
    request: pytest.FixtureRequest,
    changes: dict[str, Any],
    args: list[str],
    expected: str,
) -> None:
    service: Service = request.getfixturevalue(
        f"{'pg' if database == 'postgresql' else 'sqlite'}_service"
    )
    path = service.spec(dump(changed(changes)))
    assert_refused(service, ["submit", str(path), *args], f"error: {expected}")


def test_a_json_document_as_json_dumps_writes_it_is_accepted(sqlite_service: Service) -> None:
    """json.dumps escapes an emoji as a surrogate pair; it is one character, stored as one."""
    from service import db, jobs

    document = changed({"name": "run 🙂", "tags": ["ünï", "🚀 fast"]})
    raw = json.dumps(document).encode()
    assert b"\\ud83d\\ude42" in raw
    result = run_cli("submit", str(sqlite_service.spec(raw)), "-q")
    assert result.exit_code == 0, result.output
    (job_id,) = result.stdout.split()
    with db.transaction(sqlite_service.url) as session:
        (job,) = jobs.find_jobs(session=session, ids=[job_id])
        assert (job.name, job.spec["tags"]) == ("run 🙂", ["ünï", "🚀 fast"])
    # The same escapes in YAML's double quotes mean the same character.
    yaml_raw = dump(BASE).replace(b"name: base", b'name: "run \\ud83d\\ude42"')
    result = run_cli("run", str(sqlite_service.spec(yaml_raw)), "--json")
    assert result.exit_code == 0, result.output


def test_retrying_a_job_that_cannot_be_retried_is_bad_input(
    sqlite_service: Service, tmp_path: Path
) -> None:
    from tests.support import WorkerProcess, load_jobs, wait_jobs

    queued = load_jobs(sqlite_service.url)[0].id
    assert_refused(sqlite_service, ["retry", queued], "only failed, diverged or cancelled")
    worker = WorkerProcess(dict(os.environ), tmp_path / "worker.log").wait_ready()
    try:
        ids = [job.id for job in load_jobs(sqlite_service.url)]
        found = wait_jobs(sqlite_service.url, ids, timeout=120, workers=[worker])
    finally:
        worker.stop()
    assert {job.state for job in found} == {"succeeded"}
    assert_refused(
        sqlite_service, ["retry", found[0].id[:10]], "only failed, diverged or cancelled"
    )


def test_ctrl_c_exits_130_without_a_traceback(sqlite_service: Service) -> None:
    """`submit --wait` on a job no worker runs waits until SIGINT; the shell sees 130."""
    import signal
    import subprocess
    import sys

    from tests.support import wait_for

    log = sqlite_service.outside / "submit.out"
    queued = sqlite_service.state()["redis cpu"]
    # As the `lrq` console script runs it. (Under `python -m`, CPython itself may turn a
    # KeyboardInterrupt that was caught into death by SIGINT at exit, whatever code is given.)
    script = "import sys; from service.cli import main; sys.exit(main())"
    argv = [sys.executable, "-c", script, "submit", str(sqlite_service.specs / "base.yaml")]
    with log.open("wb") as out:
        process = subprocess.Popen(
            [*argv, "--wait"],
            env=dict(os.environ),
            stdout=out,
            stderr=subprocess.PIPE,
        )
        try:
            wait_for(
                lambda: sqlite_service.state()["redis cpu"] > queued,
                timeout=60,
                what="the job queued, and submit waiting for it",
            )
            assert b"queue=cpu" in log.read_bytes()
            process.send_signal(signal.SIGINT)
            _, stderr = process.communicate(timeout=60)
        finally:
            if process.poll() is None:
                process.kill()
                process.wait(10)
    assert process.returncode == 130, stderr
    # The watch may have printed its first progress line before the signal came.
    assert stderr.decode().splitlines()[-1] == "interrupted"
    assert "Traceback" not in stderr.decode()


# -- a relative data.path is taken from the spec file's directory -------------------------------


def test_a_relative_data_path_is_taken_from_the_spec_files_directory(
    sqlite_service: Service, monkeypatch: pytest.MonkeyPatch
) -> None:
    from service import db, jobs
    from service.datasets import decode

    project = sqlite_service.data / "project"
    (project / "specs").mkdir(parents=True)
    (project / "points.csv").write_bytes(GOOD_CSV.replace(b"15", b"17"))
    spec_path = project / "specs" / "fit.yaml"
    spec_path.write_bytes(dump(file_spec("../points.csv")))
    # '..' stays refused; a path below the spec's own directory is found from anywhere.
    assert_refused(sqlite_service, ["submit", str(spec_path)], "'..' is not allowed")
    (project / "specs" / "points.csv").write_bytes(GOOD_CSV.replace(b"15", b"18"))
    spec_path.write_bytes(dump(file_spec("points.csv")))
    monkeypatch.chdir(sqlite_service.outside)
    result = run_cli("submit", str(spec_path), "-q")
    assert result.exit_code == 0, result.output
    (job_id,) = result.stdout.split()
    with db.transaction(sqlite_service.url) as session:
        (job,) = jobs.find_jobs(session=session, ids=[job_id])
        dataset = jobs.find_dataset(job.dataset_id or "", session=session)
        assert dataset.name == "points.csv"
        assert max(decode(dataset.content).y) == 18  # the file beside the spec, not another
    ran = run_cli("run", str(spec_path), "--json")
    assert ran.exit_code == 0, ran.output


def test_a_missing_data_file_names_the_full_path_tried(sqlite_service: Service) -> None:
    sub = sqlite_service.data / "sub"
    sub.mkdir()
    spec_path = sub / "spec.yaml"
    spec_path.write_bytes(dump(file_spec("nope.csv")))
    tried = sub.resolve() / "nope.csv"
    for command in ("submit", "run"):
        assert_refused(
            sqlite_service,
            [command, str(spec_path)],
            f"error: data.path 'nope.csv': no such file (looked for {tried})",
        )


def test_a_spec_outside_the_data_directory_cannot_reach_past_it(sqlite_service: Service) -> None:
    """The data directory rule holds whichever directory a relative path starts from."""
    (sqlite_service.outside / "good.csv").write_bytes(GOOD_CSV)
    spec_path = sqlite_service.outside / "spec.yaml"
    spec_path.write_bytes(dump(file_spec("good.csv")))
    tried = sqlite_service.outside.resolve() / "good.csv"
    root = sqlite_service.data.resolve()
    assert_refused(
        sqlite_service,
        ["submit", str(spec_path)],
        f"error: data.path 'good.csv': {tried} is outside the data directory '{root}'",
    )
