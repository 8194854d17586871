"""The client stays light: `lrq submit`, `lrq status` and `lrq results` never import torch."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

#: Runs the commands in a fresh interpreter, then prints the torch modules it holds.
SCRIPT = """
import json, sys
from click.testing import CliRunner
from service.cli import main

def lrq(*args):
    result = CliRunner().invoke(main, list(args), catch_exceptions=False)
    print(json.dumps({"args": list(args), "code": result.exit_code, "stdout": result.stdout}))
    return result.stdout

spec = sys.argv[1]
lrq("db", "upgrade")
ids = lrq("submit", spec, "-q").split()
swept = lrq("submit", spec, "--grid", "optimizer.lr=1e-4,1e-3", "-q").splitlines()
assert swept[0].startswith("# sweep "), swept
ids += swept[1:]
lrq("status")
lrq("status", "--format", "json")
lrq("cancel", *ids)
lrq("results", *ids, "--format", "csv")
lrq("results", *ids, "--history", "--format", "json")
print(json.dumps(sorted(m for m in sys.modules if m == "torch" or m.startswith("torch."))))
"""


def test_client_commands_never_import_torch(tmp_path: Path) -> None:
    # No LRQ_* variables but a home: a temporary SQLite database and filesystem broker.
    env = {k: v for k, v in os.environ.items() if not k.startswith("LRQ_")}
    env.update(LRQ_HOME=str(tmp_path / "home"), PYTHONPATH=str(ROOT))
    spec = str(ROOT / "examples" / "tutorial_torch.yaml")
    done = subprocess.run(
        [sys.executable, "-c", SCRIPT, spec],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    *runs, torch_modules = (json.loads(line) for line in done.stdout.splitlines())
    commands = ["db", "submit", "submit", "status", "status", "cancel", "results", "results"]
    assert [(run["args"][0], run["code"]) for run in runs] == [(c, 0) for c in commands]
    status = [line.split() for line in runs[3]["stdout"].splitlines()[1:]]
    assert [row[1].startswith("tutorial-torch") for row in status] == [True] * 3
    assert [row[2:5] for row in status] == [["torch", "cpu", "queued"]] * 3
    assert len(json.loads(runs[7]["stdout"])) == 0
    assert torch_modules == []


#: Runs `lrq status` on a migrated database, then prints the heavy modules it loaded.
STATUS_SCRIPT = """
import json, sys
from click.testing import CliRunner
from service.cli import main

assert CliRunner().invoke(main, ["db", "upgrade"]).exit_code == 0
heavy = ("pydantic", "pydantic_settings", "yaml", "alembic", "torch", "numpy", "pandas")
for name in [m for m in sys.modules if m.split(".")[0] in heavy]:
    del sys.modules[name]  # `db upgrade` needs Alembic; status must not load it again
result = CliRunner().invoke(main, ["status"], catch_exceptions=False)
loaded = sorted({m.split(".")[0] for m in sys.modules if m.split(".")[0] in heavy})
print(json.dumps({"code": result.exit_code, "stdout": result.stdout, "loaded": loaded}))
"""


def test_status_starts_without_pydantic_yaml_or_alembic(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("LRQ_")}
    env.update(LRQ_HOME=str(tmp_path / "home"), PYTHONPATH=str(ROOT))
    done = subprocess.run(
        [sys.executable, "-c", STATUS_SCRIPT],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    outcome = json.loads(done.stdout.splitlines()[-1])
    assert outcome["code"] == 0
    assert outcome["stdout"].split()[:5] == ["ID", "NAME", "BACKEND", "DEVICE", "STATE"]
    assert outcome["loaded"] == []


def test_importing_the_cli_loads_no_pydantic_yaml_or_alembic() -> None:
    code = (
        "import sys, service.cli; "
        "print(sorted({m.split('.')[0] for m in sys.modules} & {'pydantic', 'yaml', 'alembic'}))"
    )
    done = subprocess.run(
        [sys.executable, "-c", code],
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert done.stdout.strip() == "[]"
