"""`lrq datasets show` (statistics and the least-squares fit, against numpy on the file) and
`lrq datasets rm` (refused while a job refers to the dataset)."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import yaml

from tests.support import run_cli, submit_ids

ROOT = Path(__file__).resolve().parents[2]


def write_points(path: Path, rng: np.random.Generator, coefficients: np.ndarray) -> np.ndarray:
    rows = int(rng.integers(50, 400))
    x = rng.normal(size=(rows, len(coefficients)))
    y = x @ coefficients + 0.7 + rng.normal(scale=0.1, size=rows)
    table = np.column_stack([x, y])
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow([*(f"X{i}" for i in range(len(coefficients))), "Y"])
        writer.writerows(table.tolist())
    return table


def test_show_and_rm(lrq_env: dict[str, str], tmp_path: Path) -> None:
    data_dir = Path(lrq_env["LRQ_DATA_DIR"])
    rng = np.random.default_rng()
    table = write_points(data_dir / "points.csv", rng, rng.normal(size=3))
    write_points(data_dir / "unused.csv", rng, rng.normal(size=2))
    for name in ("points", "unused"):
        added = run_cli("datasets", "add", f"{name}.csv", "--target", "Y", "--name", name)
        assert added.exit_code == 0, added.output

    shown = run_cli("datasets", "show", "points", "--format", "json")
    assert shown.exit_code == 0, shown.output
    summary = json.loads(shown.stdout)
    x, y = table[:, :-1], table[:, -1]
    assert (summary["rows"], summary["features"], summary["target"]) == (len(y), 3, "Y")
    for index, column in enumerate(summary["columns"]):
        values = table[:, index]
        assert column["column"] == (f"X{index}" if index < 3 else "Y")
        assert column["role"] == ("feature" if index < 3 else "target")
        assert np.isclose(column["mean"], values.mean(), rtol=1e-12, atol=1e-12)
        assert np.isclose(column["std"], values.std(), rtol=1e-12)
        assert (column["min"], column["max"]) == (values.min(), values.max())
    # The fit against numpy's least squares on the file's numbers.
    design = np.column_stack([x, np.ones(len(y))])
    solution = np.linalg.lstsq(design, y, rcond=None)[0]
    fit = summary["fit"]
    assert np.allclose(fit["weights"], solution[:-1], rtol=1e-9, atol=1e-12)
    assert np.isclose(fit["bias"], solution[-1], rtol=1e-9, atol=1e-12)
    mse = float(np.mean((y - design @ solution) ** 2))
    assert np.isclose(fit["mse"], mse, rtol=1e-9)
    assert np.isclose(fit["r2"], 1 - mse / np.var(y), rtol=1e-9)
    assert [c["coefficient"] for c in summary["columns"]][:3] == fit["weights"]

    as_process = subprocess.run(
        [sys.executable, "-m", "service.cli", "datasets", "show", "points"],
        env={**lrq_env, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert as_process.returncode == 0, as_process.stderr
    lines = as_process.stdout.splitlines()
    assert lines[0].split()[2:] == [str(len(y)), "rows", "x", "3", "features,", "target", "Y"]
    assert lines[1].split() == ["COLUMN", "ROLE", "MEAN", "STD", "MIN", "MAX", "COEFFICIENT"]
    assert lines[-1].startswith("least squares: bias ")

    spec = tmp_path / "uses.yaml"
    spec.write_text(
        yaml.safe_dump(
            {
                "name": "uses-points",
                "data": {"dataset": "points", "target": "Y"},
                "backend": "numpy",
                "epochs": 2,
            }
        )
    )
    [job_id] = submit_ids(str(spec))
    refused = run_cli("datasets", "rm", "points")
    assert refused.exit_code == 1
    assert refused.stderr.strip() == (
        f"error: datasets rm: 'points' is used by 1 job(s) (e.g. {job_id[:12]}); "
        "it stays while a job refers to it"
    )
    still = subprocess.run(
        [sys.executable, "-m", "service.cli", "datasets", "rm", "points"],
        env={**lrq_env, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert (still.returncode, still.stderr) == (1, refused.stderr)
    removed = run_cli("datasets", "rm", "unused")
    assert removed.exit_code == 0, removed.output
    assert removed.stdout.split()[::2] == ["removed", "unused"]
    listed = json.loads(run_cli("datasets", "list", "--format", "json").stdout)
    assert [d["name"] for d in listed] == ["points"]
    missing = run_cli("datasets", "show", "unused")
    assert missing.exit_code == 2
    assert "no dataset with id or name 'unused'" in missing.stderr
