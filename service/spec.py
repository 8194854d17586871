"""JobSpec: parse, validate, override and expand sweeps. No torch here."""

from __future__ import annotations

import copy
import datetime as dt
import itertools
import json
import math
import os
import re
import stat
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from service.errors import LimitError, SpecError
from service.settings import Settings

#: A spec file larger than this is refused before it is parsed.
MAX_SPEC_BYTES = 1024 * 1024
#: Deeper nesting than this is refused (no spec field nests past 4).
MAX_SPEC_DEPTH = 16
#: More values than this is refused: without YAML aliases a spec has fewer values than bytes,
#: and aliases can multiply a few hundred bytes into billions of values.
MAX_SPEC_VALUES = MAX_SPEC_BYTES


def _refuse_bool(value: Any) -> Any:
    # YAML turns `yes` into True; a number field must not quietly take it as 1.
    if isinstance(value, bool):
        raise ValueError(f"must be a number, got {value!r}")
    return value


#: The length of the name, target and queue-free text columns (service/models.py: String(200)).
MAX_NAME_LENGTH = 200


def text_problem(value: str) -> str | None:
    """Why a database cannot store this text (a NUL, a lone surrogate), or None."""
    if "\x00" in value:
        return "must not contain a NUL character"
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        return f"not valid UTF-8 text (character {exc.start + 1})"
    return None


def check_storable_text(value: str) -> str:
    """The text, if a database can store it, else ValueError."""
    problem = text_problem(value)
    if problem is not None:
        raise ValueError(problem)
    return value


Float = Annotated[float, BeforeValidator(_refuse_bool)]
Int = Annotated[int, BeforeValidator(_refuse_bool)]
#: Text stored in a String(200) column (names, targets, features).
Name = Annotated[
    str, Field(min_length=1, max_length=MAX_NAME_LENGTH), AfterValidator(check_storable_text)
]
Tag = Annotated[str, Field(max_length=MAX_NAME_LENGTH), AfterValidator(check_storable_text)]
#: Synthetic data past this size overflows a float32 sum of squares, or the data itself.
MAX_SYNTHETIC_MAGNITUDE = 1e9
Magnitude = Annotated[
    float,
    BeforeValidator(_refuse_bool),
    Field(ge=-MAX_SYNTHETIC_MAGNITUDE, le=MAX_SYNTHETIC_MAGNITUDE),
]
#: A test loss every this many epochs at most (it is also taken at the last epoch).
MAX_EVAL_EVERY = 1_000_000_000


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False, frozen=True)


class SyntheticData(_Strict):
    """y = X·coefficients + intercept + noise_std·N(0, 1), X ~ N(0, 1)."""

    n_samples: Int = Field(1000, gt=1)
    n_features: Int = Field(3, gt=0)
    coefficients: list[Magnitude] | None = None
    intercept: Magnitude = 0.0
    noise_std: Float = Field(0.0, ge=0, le=MAX_SYNTHETIC_MAGNITUDE)
    generator: Literal["numpy", "torch"] = "numpy"
    seed: Int = Field(0, ge=0, lt=2**32)

    @model_validator(mode="after")
    def _coefficients_match(self) -> SyntheticData:
        if self.coefficients is not None and len(self.coefficients) != self.n_features:
            raise ValueError(
                f"coefficients: expected {self.n_features} values (n_features), "
                f"got {len(self.coefficients)}"
            )
        return self

    def true_coefficients(self) -> list[float]:
        """The coefficients, defaulting to 1, 2, ..., n_features."""
        if self.coefficients is not None:
            return list(self.coefficients)
        return [float(i + 1) for i in range(self.n_features)]


class TestSet(_Strict):
    """Either a held-out fraction of the data or a fresh synthetic draw."""

    fraction: Float | None = Field(None, gt=0, lt=1)
    n_samples: Int | None = Field(None, gt=0)
    seed: Int | None = Field(None, ge=0, lt=2**32)

    @model_validator(mode="after")
    def _one_kind(self) -> TestSet:
        if (self.fraction is None) == (self.n_samples is None):
            raise ValueError("give exactly one of fraction or n_samples")
        if self.fraction is not None and self.seed is not None:
            raise ValueError("seed: only for a fresh draw (n_samples)")
        return self


class DataSpec(_Strict):
    """Synthetic data, a file to register, or a registered dataset."""

    synthetic: SyntheticData | None = None
    path: Name | None = None
    dataset: Name | None = None
    target: Name | None = None
    features: list[Name] | None = Field(None, min_length=1)
    test: TestSet | None = None

    @model_validator(mode="after")
    def _one_source(self) -> DataSpec:
        given = [k for k in ("synthetic", "path", "dataset") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(
                "give exactly one of synthetic, path or dataset"
                + (f" (got {', '.join(given)})" if given else "")
            )
        if self.synthetic is not None:
            if self.target is not None or self.features is not None:
                raise ValueError("target/features: only for path or dataset data")
        elif self.path is not None and self.target is None:
            raise ValueError("target: required with path")
        if self.features is not None and len(set(self.features)) != len(self.features):
            raise ValueError("features: names repeat")
        if self.features is not None and self.target in self.features:
            raise ValueError(f"features: the target {self.target!r} cannot be a feature")
        if self.test is not None and self.test.n_samples is not None and self.synthetic is None:
            raise ValueError("test.n_samples: a fresh draw needs synthetic data")
        return self


class ExplicitInit(_Strict):
    weights: list[Float] = Field(min_length=1)
    bias: Float | None = None


class ModelSpec(_Strict):
    fit_intercept: bool = True
    init: Literal["default", "zeros"] | ExplicitInit = "default"

    @field_validator("init", mode="before")
    @classmethod
    def _init_form(cls, value: Any) -> Any:
        if isinstance(value, str) and value not in ("default", "zeros"):
            raise ValueError(f"must be 'default', 'zeros' or {{weights, bias}}, got {value!r}")
        if not isinstance(value, str | dict | ExplicitInit):
            raise ValueError(f"must be 'default', 'zeros' or {{weights, bias}}, got {value!r}")
        return value

    @model_validator(mode="after")
    def _bias_matches(self) -> ModelSpec:
        if isinstance(self.init, ExplicitInit):
            if self.fit_intercept and self.init.bias is None:
                raise ValueError("init.bias: required when fit_intercept is true")
            if not self.fit_intercept and self.init.bias is not None:
                raise ValueError("init.bias: not allowed when fit_intercept is false")
        return self


class LossSpec(_Strict):
    reduction: Literal["sum", "mean"] = "sum"


class OptimizerSpec(_Strict):
    """The options mean what torch.optim.SGD's mean, for both backends."""

    lr: Float = Field(1e-4, gt=0)
    momentum: Float = Field(0.0, ge=0)
    dampening: Float = Field(0.0, ge=0)
    weight_decay: Float = Field(0.0, ge=0)
    nesterov: bool = False

    @model_validator(mode="after")
    def _nesterov_rule(self) -> OptimizerSpec:
        if self.nesterov and (self.momentum <= 0 or self.dampening != 0):
            raise ValueError("nesterov: needs momentum > 0 and dampening = 0")
        return self


class JobSpec(_Strict):
    """One training run."""

    name: Name = "job"
    tags: list[Tag] = Field(default_factory=list, max_length=50)
    data: DataSpec
    backend: Literal["torch", "numpy"] = "torch"
    device: Literal["cpu", "cuda", "auto"] = "cpu"
    model: ModelSpec = ModelSpec()
    loss: LossSpec = LossSpec()
    optimizer: OptimizerSpec = OptimizerSpec()
    epochs: Int = Field(100, gt=0)
    batch_size: Int | None = Field(None, gt=0)
    shuffle: bool = True
    seed: Int = Field(0, ge=0, lt=2**32)
    dtype: Literal["float32", "float64"] = "float32"
    eval_every: Int = Field(1, gt=0, le=MAX_EVAL_EVERY)
    #: ``fused``: the fast paths; ``loop``: the reference loops; ``auto``: fused where it can.
    engine: Literal["auto", "fused", "loop"] = "auto"

    @model_validator(mode="after")
    def _cross_checks(self) -> JobSpec:
        if self.backend == "numpy" and self.device == "cuda":
            raise ValueError("device: the numpy backend runs on the cpu only")
        synthetic = self.data.synthetic
        if synthetic is not None:
            if self.batch_size is not None and self.batch_size > self.n_train_rows():
                raise ValueError(
                    f"batch_size: {self.batch_size} is more than the "
                    f"{self.n_train_rows()} training rows"
                )
            init = self.model.init
            if isinstance(init, ExplicitInit) and len(init.weights) != synthetic.n_features:
                raise ValueError(
                    f"model.init.weights: expected {synthetic.n_features} values "
                    f"(data.synthetic.n_features), got {len(init.weights)}"
                )
        return self

    @property
    def queue(self) -> str:
        """The queue this spec routes to; ``auto`` runs where a GPU is, else on a CPU."""
        return "gpu" if self.device == "cuda" else "cpu"

    def n_train_rows(self) -> int:
        """Training rows for synthetic data (held-out rows removed)."""
        assert self.data.synthetic is not None
        n = self.data.synthetic.n_samples
        test = self.data.test
        if test is not None and test.fraction is not None:
            n -= held_out_rows(n, test.fraction)
        return n

    def to_json(self) -> dict[str, Any]:
        return self.model_dump(mode="json")


def held_out_rows(n: int, fraction: float) -> int:
    """Rows a test fraction holds out: at least one, leaving at least one."""
    return min(max(1, round(n * fraction)), n - 1)


# -- errors ---------------------------------------------------------------------------------


def _show(value: Any) -> str:
    text = json.dumps(value) if not isinstance(value, float) else repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _message(error: Mapping[str, Any]) -> str:
    kind = error["type"]
    ctx = error.get("ctx") or {}
    got = error.get("input")
    bounds = {
        "greater_than": ">",
        "greater_than_equal": ">=",
        "less_than": "<",
        "less_than_equal": "<=",
    }
    if kind in bounds:
        bound = next(iter(ctx.values()))
        shown = bound if isinstance(bound, int) else f"{bound:g}"  # 2**32, not 4.29497e+09
        return f"must be {bounds[kind]} {shown}, got {_show(got)}"
    if kind == "extra_forbidden":
        return "unknown field"
    if kind == "missing":
        return "required"
    if kind == "literal_error":
        return f"must be one of {ctx.get('expected')}, got {_show(got)}"
    if kind == "finite_number":
        return f"must be a finite number, got {_show(got)}"
    if kind.startswith("int_") or kind == "int_from_float":
        return f"must be an integer, got {_show(got)}"
    if kind.startswith("float_"):
        return f"must be a number, got {_show(got)}"
    if kind.startswith("bool_"):
        return f"must be true or false, got {_show(got)}"
    if kind.startswith("string_") or kind == "str_type":
        return f"{error['msg'].lower()}, got {_show(got)}"
    if kind in ("list_type", "too_short", "too_long"):
        return f"{error['msg'].lower()}"
    if kind in ("model_type", "dict_type", "model_attributes_type"):
        return f"must be a mapping, got {_show(got)}"
    if kind == "value_error":
        return str(ctx.get("error", error["msg"]))
    return str(error["msg"])


def _location(parts: Iterable[Any]) -> str:
    out = ""
    for part in parts:
        if isinstance(part, int):
            out += f"[{part}]"
        elif "[" in str(part) or str(part)[:1].isupper():
            continue  # a union branch's tag, not a field
        else:
            out += ("." if out else "") + str(part)
    return out


def format_validation_error(exc: ValidationError, prefix: str = "") -> str:
    """One line per problem: ``optimizer.lr: must be > 0, got -1``."""
    lines = []
    errors = exc.errors()
    for error in errors:
        parts = [*([prefix] if prefix else []), *error["loc"]]
        here = _location(error["loc"])
        if error["type"] == "literal_error" and any(
            _location(other["loc"]).startswith(f"{here}.") for other in errors
        ):
            continue  # a union's other branch explains the problem more precisely
        if error["type"] == "extra_forbidden" and parts:
            # The last part is the user's own key: name it even if it looks like a union tag.
            parent = _location(parts[:-1])
            loc = f"{parent}.{parts[-1]}" if parent else str(parts[-1])
        else:
            loc = _location(parts)
        message = _message(error)
        # A model-level check names its own field ("coefficients: ..."): join the two paths.
        head, sep, rest = message.partition(": ")
        if sep and head.replace(".", "").replace("_", "").isalnum() and " " not in head:
            loc = f"{loc}.{head}" if loc else head
            message = rest
        lines.append(f"{loc}: {message}" if loc else message)
    return "; ".join(dict.fromkeys(lines))


# -- parsing --------------------------------------------------------------------------------


def _depth(value: Any, level: int = 0) -> int:
    if level > MAX_SPEC_DEPTH:
        return level
    if isinstance(value, dict):
        return max([_depth(v, level + 1) for v in value.values()], default=level + 1)
    if isinstance(value, list):
        return max([_depth(v, level + 1) for v in value], default=level + 1)
    return level


def _count_values(value: Any, budget: int) -> int:
    """Values in a document, counted (aliases included) until the budget runs out."""
    stack, count = [value], 0
    while stack and count <= budget:
        item = stack.pop()
        count += 1
        if isinstance(item, dict):
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return count


def _check_shape(value: Any, source: str) -> None:
    # Count first: walking an alias bomb for its depth would never finish.
    if _count_values(value, MAX_SPEC_VALUES) > MAX_SPEC_VALUES:
        raise SpecError(f"{source}: more than {MAX_SPEC_VALUES} values (YAML aliases?)")
    if _depth(value) > MAX_SPEC_DEPTH:
        raise SpecError(f"{source}: nested too deeply")


_NOT_JSON = object()
_SURROGATE_PAIR = re.compile("[\ud800-\udbff][\udc00-\udfff]")


def _parse_json(text: str, source: str) -> Any:
    """A JSON document parsed as JSON (its ``\\ud83d\\ude00`` escapes joined), or _NOT_JSON."""
    if not text.lstrip().startswith("{"):
        return _NOT_JSON
    try:
        return json.loads(text)
    except ValueError:
        return _NOT_JSON  # YAML's flow mappings start with "{" too, and give better messages
    except RecursionError:
        raise SpecError(f"{source}: nested too deeply") from None


def _join_pairs(text: str) -> str:
    return _SURROGATE_PAIR.sub(
        lambda pair: pair.group().encode("utf-16-le", "surrogatepass").decode("utf-16-le"), text
    )


def _join_surrogate_pairs(value: Any) -> Any:
    """YAML's ``"\\ud83d\\ude00"`` is two halves of one character (PyYAML keeps them apart)."""
    if isinstance(value, str):
        return _join_pairs(value)
    if isinstance(value, dict):
        return {_join_surrogate_pairs(k): _join_surrogate_pairs(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_join_surrogate_pairs(item) for item in value]
    return value


def parse_document(raw: bytes, source: str = "spec") -> dict[str, Any]:
    """Decode a YAML or JSON document into a mapping, refusing what is not one."""
    if len(raw) > MAX_SPEC_BYTES:
        raise SpecError(f"{source}: larger than {MAX_SPEC_BYTES} bytes")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise SpecError(f"{source}: not UTF-8 text (byte {exc.start})") from None
    if not text.strip():
        raise SpecError(f"{source}: empty")
    document = _parse_json(text, source)
    if document is _NOT_JSON:
        try:
            document = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            where = f" at line {mark.line + 1}" if mark is not None else ""
            raise SpecError(f"{source}: not valid YAML or JSON{where}") from None
        except RecursionError:
            raise SpecError(f"{source}: nested too deeply") from None
    if not isinstance(document, dict):
        raise SpecError(f"{source}: must be a mapping of fields, got {type(document).__name__}")
    _check_shape(document, source)
    # After the shape check: walking an alias bomb would never finish.
    joined: dict[str, Any] = _join_surrogate_pairs(document)
    for key in joined:
        if not isinstance(key, str):
            raise SpecError(f"{source}: field names must be strings, got {key!r}")
    return joined


def read_spec_file(path: str | Path) -> bytes:
    """A spec file's bytes, at most MAX_SPEC_BYTES of them, refusing what is not a regular file."""
    path = Path(path)
    # O_NONBLOCK: opening a FIFO must not wait for a writer; fstat then refuses it.
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0)
    try:
        fd = os.open(path, flags)
    except OSError as exc:
        raise SpecError(f"{path}: cannot read ({exc.strerror})") from None
    except ValueError:
        raise SpecError(f"{path}: not a valid file name") from None
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode):
        os.close(fd)
        what = "cannot read (Is a directory)" if stat.S_ISDIR(mode) else "not a regular file"
        raise SpecError(f"{path}: {what}")
    with os.fdopen(fd, "rb") as handle:
        try:
            # One byte past the limit tells a file that is too large, however large it is.
            raw = handle.read(MAX_SPEC_BYTES + 1)
        except OSError as exc:
            raise SpecError(f"{path}: cannot read ({exc.strerror})") from None
    if len(raw) > MAX_SPEC_BYTES:
        raise SpecError(f"{path}: larger than {MAX_SPEC_BYTES} bytes")
    return raw


def load_document(path: str | Path) -> dict[str, Any]:
    """Read a spec file (YAML or JSON)."""
    return parse_document(read_spec_file(path), str(path))


def spec_directory(path: str | Path) -> Path:
    """The directory a spec file's relative ``data.path`` is taken from: the file's own."""
    # The directory's links are resolved (so the data directory check sees the real path);
    # the spec file itself may be a link placed anywhere.
    return Path(path).absolute().parent.resolve()


def parse_value(text: str) -> Any:
    """A command-line value, read as a YAML scalar or list: ``1e-3``, ``null``, ``[1, 2]``."""
    try:
        value = yaml.safe_load(text) if text.strip() else text
    except yaml.YAMLError:
        return text
    if isinstance(value, dt.date):
        return text  # no spec field is a date: ``2024-01-01`` is a name
    if isinstance(value, str) and _NUMBER.fullmatch(value.strip()):
        return float(value)  # YAML 1.1 reads ``1e3`` (no dot) as text
    return value


_NUMBER = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")


def _parse_option_value(text: str, where: str) -> Any:
    try:
        value = parse_value(text)
    except RecursionError:
        raise SpecError(f"{where}: nested too deeply") from None
    _check_shape(value, where)
    return value


def _split_assignment(item: str, option: str) -> tuple[list[str], str]:
    key, sep, value = item.partition("=")
    parts = key.strip().split(".")
    if not sep or not all(p.strip() for p in parts):
        raise SpecError(f"{option} {item!r}: expected key.path=value")
    return [p.strip() for p in parts], value


def set_path(document: dict[str, Any], parts: Sequence[str], value: Any, option: str) -> None:
    node = document
    for i, part in enumerate(parts[:-1]):
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise SpecError(
                f"{option} {'.'.join(parts)}: {'.'.join(parts[: i + 1])} is not a mapping"
            )
        node = child
    node[parts[-1]] = value


def apply_overrides(document: dict[str, Any], overrides: Iterable[str]) -> dict[str, Any]:
    """Apply ``--set key.path=value`` items to a copy of a document."""
    out = copy.deepcopy(document)
    for item in overrides:
        parts, value = _split_assignment(item, "--set")
        set_path(out, parts, _parse_option_value(value, f"--set {'.'.join(parts)}"), "--set")
    return out


def validate(document: Mapping[str, Any]) -> JobSpec:
    """A validated JobSpec, or SpecError naming every bad field."""
    try:
        return JobSpec.model_validate(dict(document))
    except ValidationError as exc:
        raise SpecError(format_validation_error(exc)) from None


def parse_grid(items: Iterable[str]) -> list[tuple[list[str], list[Any]]]:
    """``--grid optimizer.lr=1e-4,1e-3`` items, as (path, values) pairs."""
    axes: list[tuple[list[str], list[Any]]] = []
    seen: set[str] = set()
    for item in items:
        parts, raw = _split_assignment(item, "--grid")
        key = ".".join(parts)
        if key in seen:
            raise SpecError(f"--grid {key}: given twice")
        seen.add(key)
        values = [_parse_option_value(v, f"--grid {key}") for v in raw.split(",")]
        if not raw.strip() or any(isinstance(v, str) and not v.strip() for v in values):
            raise SpecError(f"--grid {key}: empty value in {raw!r}")
        axes.append((parts, values))
    return axes


def expand(
    document: Mapping[str, Any], grid: Iterable[str] = (), *, max_points: int = 10_000
) -> list[JobSpec]:
    """One validated spec per grid point (one spec when there is no grid)."""
    axes = parse_grid(grid)
    if not axes:
        return [validate(document)]
    points = math.prod(len(values) for _, values in axes)
    if points > max_points:
        raise LimitError(f"--grid: {points} points, more than the limit of {max_points}")
    specs = []
    base_name = str(document.get("name", "job"))
    for combo in itertools.product(*(values for _, values in axes)):
        point = copy.deepcopy(dict(document))
        label = []
        for (parts, _), value in zip(axes, combo, strict=True):
            set_path(point, parts, value, "--grid")
            label.append(f"{parts[-1]}={value}")
        point["name"] = f"{base_name}[{','.join(label)}]"[:200]
        try:
            specs.append(JobSpec.model_validate(point))
        except ValidationError as exc:
            raise SpecError(
                f"grid point {', '.join(label)}: {format_validation_error(exc)}"
            ) from None
    return specs


# -- limits ---------------------------------------------------------------------------------


def check_limits(
    spec: JobSpec, settings: Settings, *, rows: int | None = None, features: int | None = None
) -> None:
    """Refuse a spec that would exhaust a worker. Rows/features default to the synthetic ones."""
    synthetic = spec.data.synthetic
    if synthetic is not None:
        rows = synthetic.n_samples
        features = synthetic.n_features
        if spec.data.test is not None and spec.data.test.n_samples is not None:
            rows += spec.data.test.n_samples
    if rows is not None and rows > settings.max_rows:
        field = "data.synthetic.n_samples" if synthetic else "data"
        raise LimitError(f"{field}: {rows} rows, more than the limit of {settings.max_rows}")
    if features is not None and features > settings.max_features:
        field = "data.synthetic.n_features" if synthetic else "data.features"
        raise LimitError(
            f"{field}: {features} features, more than the limit of {settings.max_features}"
        )
    if spec.epochs > settings.max_epochs:
        raise LimitError(f"epochs: {spec.epochs}, more than the limit of {settings.max_epochs}")
    if rows is not None and rows * spec.epochs > settings.max_row_epochs:
        raise LimitError(
            f"epochs: {rows} rows x {spec.epochs} epochs, more than the limit of "
            f"{settings.max_row_epochs}"
        )
    if rows is not None:
        # A step costs about the same whatever the batch's size: small batches are what make a
        # job run for days, long after the row x epoch budget says it is cheap.
        train_rows = spec.n_train_rows() if synthetic is not None else rows
        if synthetic is None and spec.data.test is not None and spec.data.test.fraction:
            train_rows -= held_out_rows(rows, spec.data.test.fraction)
        per_epoch = 1 if spec.batch_size is None else -(-max(train_rows, 1) // spec.batch_size)
        steps = per_epoch * spec.epochs
        if steps > settings.max_steps:
            field = "epochs" if spec.batch_size is None else "batch_size"
            raise LimitError(
                f"{field}: {spec.epochs} epochs x {per_epoch} steps each (batch_size "
                f"{spec.batch_size or 'full'} of {train_rows} training rows) is {steps} "
                f"optimizer steps, more than the limit of {settings.max_steps}"
            )


def flatten(document: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"optimizer": {"lr": 1}}`` as ``{"optimizer.lr": 1}``; lists stay values."""
    out: dict[str, Any] = {}
    for key, value in document.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(flatten(value, f"{name}."))
        else:
            out[name] = value
    return out
