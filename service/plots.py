"""Loss curves of jobs and sweeps: to a file with matplotlib, or as text with plotext.

Every curve is the mean squared error per row (a ``sum`` run's loss divided by its rows), so
``sum`` and ``mean`` runs share one axis; ``gap`` is that minus the least-squares optimum's.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from service.errors import InputError

if TYPE_CHECKING:
    import pandas as pd

    from service.models import Job

#: The file formats ``lrq plot -o`` writes, by extension.
FORMATS = {".png": "png", ".svg": "svg", ".pdf": "pdf"}
#: Pixels per inch of a PNG; its size is the figure's inches times this.
DPI = 100
#: Inches of one panel.
PANEL = (8.0, 5.0)
#: Up to this many curves get a legend; more are coloured by a colour bar.
LEGEND_MAX = 10

Y_LABELS = {
    "loss": "loss: mean squared error per row",
    "gap": "optimum gap: MSE per row minus the least-squares MSE",
}


def file_format(output: str) -> str:
    """The format a file's extension asks for; InputError naming -o for any other."""
    suffix = Path(output).suffix.lower()
    if suffix not in FORMATS:
        raise InputError(
            f"-o: unknown plot format {suffix or '(none)'!r} in {output!r}; use .png, .svg or .pdf"
        )
    return FORMATS[suffix]


def row_counts(spec: dict[str, Any], dataset_rows: int | None) -> tuple[int, int | None]:
    """Training and test rows of a job, from its spec (and its dataset's rows)."""
    from service.spec import held_out_rows

    data = spec.get("data") or {}
    synthetic = data.get("synthetic")
    total = int(synthetic["n_samples"]) if synthetic else int(dataset_rows or 0)
    test = data.get("test") or {}
    if test.get("fraction") is not None:
        held = held_out_rows(total, float(test["fraction"]))
        return total - held, held
    if test.get("n_samples") is not None:
        return total, int(test["n_samples"])
    return total, None


@dataclass
class Curve:
    """One job's curve, per row: epochs, train (or gap) values, test values or None."""

    job_id: str
    label: str
    epochs: list[int]
    train: list[float]
    test: list[float] | None
    params: dict[str, Any]


def _per_row(value: Any, rows: int | None, reduction: str) -> float:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return math.nan
    number = float(value)
    return number / rows if reduction == "sum" and rows else number


def curves(
    found: Sequence[Job],
    frame: pd.DataFrame,
    *,
    y: str,
    dataset_rows: dict[str, int],
    varied: Sequence[str] = (),
) -> list[Curve]:
    """The jobs' histories per row, in the jobs' order."""
    from service.sweeps import _lookup

    grouped = {str(key): group for key, group in frame.groupby("job_id")}
    out = []
    for job in found:
        group = grouped.get(job.id)
        if group is None:
            continue
        reduction = str((job.spec.get("loss") or {}).get("reduction", "sum"))
        n_train, n_test = row_counts(job.spec, dataset_rows.get(job.dataset_id or ""))
        train = [_per_row(v, n_train, reduction) for v in group["train_loss"]]
        test = [_per_row(v, n_test, reduction) for v in group["test_loss"]]
        if y == "gap":
            optimum = _per_row((job.result or {}).get("optimum_loss"), n_train, reduction)
            train = [v - optimum for v in train]
        params = {path: _lookup(job.spec, path) for path in varied}
        out.append(
            Curve(
                job_id=job.id,
                label=f"{job.name} ({job.id[:8]})",
                epochs=[int(e) for e in group["epoch"]],
                train=train,
                test=test if any(math.isfinite(v) for v in test) else None,
                params=params,
            )
        )
    return out


def _numeric(values: Sequence[Any]) -> bool:
    return all(isinstance(v, int | float) and not isinstance(v, bool) for v in values)


def _colouring(values: Sequence[Any]) -> tuple[Any, Any]:
    """A colour map and norm for numeric values: logarithmic when they span a decade."""
    from matplotlib import colormaps
    from matplotlib.colors import LogNorm, Normalize

    low, high = min(values), max(values)
    if low > 0 and high / low >= 10:
        return colormaps["viridis"], LogNorm(low, high)
    return colormaps["viridis"], Normalize(low, high if high > low else low + 1)


def figure(
    lines: Sequence[Curve],
    *,
    varied: Sequence[str] = (),
    log: bool = True,
    y: str = "loss",
    test: bool = False,
    title: str = "",
) -> Any:
    """A matplotlib figure: one panel, or one per value of a second varied parameter.

    Each train curve's ``gid`` is its job id (test curves ``<id>:test``), so the figure's own
    data names what it shows."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib import colormaps
    from matplotlib.cm import ScalarMappable
    from matplotlib.lines import Line2D

    colour_by = varied[0] if varied else None
    panel_by = varied[1] if len(varied) > 1 else None
    panels: list[Any] = [None]
    if panel_by is not None:
        panels = list(dict.fromkeys(c.params[panel_by] for c in lines))
    columns = min(len(panels), 3)
    rows = math.ceil(len(panels) / columns)
    fig, axes = plt.subplots(
        rows,
        columns,
        figsize=(
            PANEL[0] * (1 if columns == 1 else 0.6 * columns),
            PANEL[1] * (1 if rows == 1 else 0.7 * rows),
        ),
        squeeze=False,
        sharex=True,
        sharey=True,
        layout="constrained",
    )
    flat = list(axes.flat)

    values = [c.params[colour_by] for c in lines] if colour_by else []
    mappable = None
    if colour_by and _numeric(values) and len(set(values)) > 1:
        cmap, norm = _colouring(values)
        colours = [cmap(norm(v)) for v in values]
        mappable = ScalarMappable(norm=norm, cmap=cmap)
    elif colour_by:
        distinct = list(dict.fromkeys(map(str, values)))
        palette = colormaps["tab10" if len(distinct) <= 10 else "tab20"]
        colours = [palette(distinct.index(str(v)) % palette.N) for v in values]
    elif len(lines) > LEGEND_MAX:
        cmap, norm = _colouring(list(range(len(lines))))
        colours = [cmap(norm(i)) for i in range(len(lines))]
        mappable = ScalarMappable(norm=norm, cmap=cmap)
    else:
        palette = colormaps["tab10"]
        colours = [palette(i % 10) for i in range(len(lines))]

    for curve, colour in zip(lines, colours, strict=True):
        index = panels.index(curve.params[panel_by]) if panel_by else 0
        axis = flat[index]
        train = [v if not log or v > 0 else math.nan for v in curve.train]
        axis.plot(curve.epochs, train, color=colour, linewidth=1.2, gid=curve.job_id)
        if test and curve.test is not None:
            points = [
                (e, v) for e, v in zip(curve.epochs, curve.test, strict=True) if math.isfinite(v)
            ]
            axis.plot(
                [e for e, _ in points],
                [v for _, v in points],
                color=colour,
                linewidth=1.0,
                linestyle="--",
                gid=f"{curve.job_id}:test",
            )
    for index, axis in enumerate(flat):
        if index >= len(panels):
            axis.set_visible(False)
            continue
        if log:
            axis.set_yscale("log")
        axis.grid(True, which="major", alpha=0.3)
        if panel_by is not None:
            axis.set_title(f"{panel_by} = {panels[index]}", fontsize="medium")
        if index % columns == 0:
            axis.set_ylabel(Y_LABELS[y])
        if index // columns == rows - 1 or index + columns >= len(panels):
            axis.set_xlabel("epoch")
    handles: dict[str, Any] = {}
    if mappable is not None:
        bar = fig.colorbar(mappable, ax=flat[: len(panels)], shrink=0.9)
        bar.set_label(colour_by or "job, oldest to newest")
    else:
        for curve, colour in zip(lines, colours, strict=True):
            key = f"{colour_by} = {curve.params[colour_by]}" if colour_by else curve.label
            handles.setdefault(key, Line2D([], [], color=colour))
    if test:
        handles["train (solid)"] = Line2D([], [], color="grey")
        handles["test (dashed)"] = Line2D([], [], color="grey", linestyle="--")
    if handles:
        flat[0].legend(list(handles.values()), list(handles), fontsize="small", loc="best")
    if title:
        fig.suptitle(title)
    return fig


def save(fig: Any, output: str) -> None:
    """Write the figure in the format its extension names."""
    import matplotlib.pyplot as plt

    fig.savefig(output, format=file_format(output), dpi=DPI)
    plt.close(fig)


def text_plot(
    lines: Sequence[Curve],
    *,
    log: bool,
    y: str,
    test: bool,
    width: int,
    height: int,
    colour: bool = True,
) -> str:
    """The curves drawn with characters (plotext)."""
    try:
        import plotext as plx
    except ImportError:
        raise InputError("--terminal: needs plotext (pip install 'lrq[plot]')") from None
    plx.clear_figure()
    plx.plotsize(width, height)
    plx.theme("clear")
    for curve in lines:
        label = curve.label if len(lines) <= LEGEND_MAX else None
        train = [v if not log or v > 0 else math.nan for v in curve.train]
        points = [(e, v) for e, v in zip(curve.epochs, train, strict=True) if math.isfinite(v)]
        if points:
            plx.plot([e for e, _ in points], [v for _, v in points], label=label, marker="braille")
        if test and curve.test is not None:
            tests = [
                (e, v) for e, v in zip(curve.epochs, curve.test, strict=True) if math.isfinite(v)
            ]
            if tests:
                plx.plot([e for e, _ in tests], [v for _, v in tests], marker="dot")
    if log:
        plx.yscale("log")
    plx.xlabel("epoch")
    plx.ylabel(Y_LABELS[y])
    text = str(plx.build())
    return text if colour else str(plx.uncolorize(text))
