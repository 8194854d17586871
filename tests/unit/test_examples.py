"""The example specs validate, and the demo runs exactly the tutorial examples."""

from pathlib import Path

import pytest

from service import spec
from service.demo import TUTORIAL_SPECS

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


@pytest.mark.parametrize("path", sorted(EXAMPLES.glob("*.yaml")), ids=lambda p: p.name)
def test_example_validates(path: Path) -> None:
    assert spec.validate(spec.load_document(path)).name == path.stem.replace("_", "-")


def test_demo_runs_the_tutorial_examples() -> None:
    embedded = {d["name"]: spec.validate(d) for d in TUTORIAL_SPECS}
    for name in ("tutorial_torch", "tutorial_numpy"):
        from_file = spec.validate(spec.load_document(EXAMPLES / f"{name}.yaml"))
        assert embedded[from_file.name] == from_file
