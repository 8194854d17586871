"""Data files: safe paths, strict reading, and content-addressed blobs."""

from __future__ import annotations

import hashlib
import io
import json
import os
import pickle
import struct
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from service.datasets import (
    BLOB_MAGIC,
    Table,
    decode,
    digest,
    encode,
    read_table,
    safe_path,
)
from service.errors import DataError, LimitError

GOOD_CSV = "x1,x2,Y\n1,2,3\n4,5,6\n7,8,9.5\n"


def read(
    path: Path,
    *,
    features: list[str] | None = None,
    max_bytes: int = 1 << 20,
    max_rows: int = 1000,
    max_features: int = 100,
) -> Table:
    return read_table(
        path,
        target="Y",
        features=features,
        max_bytes=max_bytes,
        max_rows=max_rows,
        max_features=max_features,
    )


@dataclass(frozen=True)
class Bad:
    """A data file that must be refused, and what the refusal must say."""

    id: str
    content: bytes | dict[str, list[object]]
    says: tuple[str, ...]
    suffix: str = ".csv"
    error: type[Exception] = DataError
    options: tuple[tuple[str, Any], ...] = ()


BAD_FILES = [
    Bad("missing-target", b"a,b\n1,2\n3,4\n5,6\n", ("'Y'", "target")),
    Bad("non-numeric", b"x1,x2,Y\n1,2,3\n4,abc,6\n7,8,9\n", ("'x2'", "data row 2", "line 3")),
    Bad("na-text", b"x1,x2,Y\n1,2,3\n4,NA,6\n7,8,9\n", ("'x2'", "data row 2", "not a number")),
    Bad("nan", b"x1,x2,Y\n1,2,3\n4,5,6\nnan,8,9\n", ("'x1'", "data row 3", "NaN")),
    Bad("inf", b"x1,x2,Y\n1,2,3\n4,5,-inf\n7,8,9\n", ("'Y'", "data row 2", "infinite")),
    Bad("overflow-to-inf", b"x1,x2,Y\n1,2,3\n4,1e999,6\n7,8,9\n", ("'x2'", "infinite")),
    Bad("empty-cell", b"x1,x2,Y\n1,2,3\n4,,6\n7,8,9\n", ("'x2'", "data row 2", "empty cell")),
    Bad("blank-cell", b"x1,x2,Y\n1,2,3\n4,5,6\n7,8, \n", ("'Y'", "data row 3", "empty cell")),
    Bad("ragged-long", b"x1,x2,Y\n1,2,3\n4,5,6,7\n7,8,9\n", ("data row 2", "line 3", "4 fields")),
    Bad("ragged-short", b"x1,x2,Y\n1,2,3\n4,5,6\n7,8\n", ("data row 3", "line 4", "2 fields")),
    Bad("one-row", b"x1,x2,Y\n1,2,3\n", ("1 data row", "at least 2")),
    Bad("features-over-rows", b"a,b,c,Y\n1,2,3,4\n5,6,7,8\n", ("3 feature columns", "2 data rows")),
    Bad("header-only", b"x1,x2,Y\n", ("no data rows",)),
    Bad("empty-file", b"", ("empty file",)),
    Bad("whitespace-file", b"\n \n\n", ("empty file",)),
    Bad("not-utf8", b"x1,x2,Y\n1,2,3\n\xff\xfe,5,6\n", ("not UTF-8", "line 3")),
    Bad("too-big", GOOD_CSV.encode(), ("bytes", "max_dataset_bytes"), error=LimitError,
        options=(("max_bytes", 10),)),
    Bad("unknown-feature", GOOD_CSV.encode(), ("'x9'", "feature"),
        options=(("features", ["x1", "x9"]),)),
    Bad("target-as-feature", GOOD_CSV.encode(), ("'Y'", "target"),
        options=(("features", ["x1", "Y"]),)),
    Bad("duplicate-column", b"x1,x1,Y\n1,2,3\n4,5,6\n7,8,9\n", ("'x1'", "twice")),
    Bad("unnamed-column", b"x1,,Y\n1,2,3\n4,5,6\n7,8,9\n", ("column 2", "no name")),
    Bad("bad-suffix", GOOD_CSV.encode(), (".xlsx",), suffix=".xlsx"),
    Bad("open-quote", b'x1,x2,Y\n1,2,3\n4,"5,6\n7,8,9\n', ("not valid CSV",)),
    Bad("too-many-rows", GOOD_CSV.encode(), ("max_rows",), error=LimitError,
        options=(("max_rows", 2),)),
    Bad("too-many-features", GOOD_CSV.encode(), ("2 feature columns", "max_features"),
        error=LimitError, options=(("max_features", 1),)),
    Bad("parquet-null", {"x1": [1.0, None, 3.0], "Y": [1.0, 2.0, 3.0]},
        ("'x1'", "data row 2", "empty cell"), suffix=".parquet"),
    Bad("parquet-text", {"x1": ["a", "b", "c"], "Y": [1.0, 2.0, 3.0]},
        ("'x1'", "not numeric"), suffix=".parquet"),
    Bad("parquet-nan", {"x1": [1.0, 2.0, 3.0], "Y": [1.0, 2.0, float("nan")]},
        ("'Y'", "data row 3", "NaN"), suffix=".parquet"),
    Bad("parquet-no-rows", {"x1": [], "Y": []}, ("no data rows",), suffix=".parquet"),
    Bad("parquet-corrupt", b"PAR1 this is not parquet PAR1", ("not a readable Parquet",),
        suffix=".pq"),
    Bad("parquet-too-many-rows", {"x1": [1.0, 2.0, 3.0], "Y": [1.0, 2.0, 3.0]}, ("max_rows",),
        suffix=".parquet", error=LimitError, options=(("max_rows", 2),)),
]  # fmt: skip


@pytest.mark.parametrize("bad", BAD_FILES, ids=[b.id for b in BAD_FILES])
def test_bad_file_is_refused_naming_the_column_or_row(tmp_path: Path, bad: Bad) -> None:
    path = tmp_path / f"data{bad.suffix}"
    if isinstance(bad.content, bytes):
        path.write_bytes(bad.content)
    else:
        pq.write_table(pa.table(bad.content), path)
    with pytest.raises(bad.error) as caught:
        read(path, **dict(bad.options))
    message = str(caught.value)
    assert message.startswith(path.name), message
    for part in bad.says:
        assert part in message, message


def test_at_least_fifteen_bad_files() -> None:
    assert len(BAD_FILES) >= 15


def test_the_client_module_does_not_import_torch() -> None:
    code = "import sys, service.datasets; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).parents[2])


# -- paths ----------------------------------------------------------------------------------


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    root = tmp_path / "data"
    (root / "sub").mkdir(parents=True)
    (root / "good.csv").write_text(GOOD_CSV)
    (root / "sub" / "inner.csv").write_text(GOOD_CSV)
    (tmp_path / "outside.csv").write_text(GOOD_CSV)
    (root / "link-in.csv").symlink_to(root / "good.csv")
    (root / "link-out.csv").symlink_to(tmp_path / "outside.csv")
    (root / "link-dir").symlink_to(root / "sub", target_is_directory=True)
    return root


@pytest.mark.parametrize(
    ("given", "says"),
    [
        ("../outside.csv", "'..'"),
        ("sub/../good.csv", "'..'"),
        ("link-in.csv", "symbolic link"),
        ("link-out.csv", "symbolic link"),
        ("link-dir/inner.csv", "symbolic link"),
        ("missing.csv", "no such file"),
        ("sub", "not a regular file"),
        ("", "not a regular file"),
        ("nul\0.csv", "not a valid file name"),
    ],
)
def test_unsafe_path_is_refused(data_dir: Path, given: str, says: str) -> None:
    with pytest.raises(DataError) as caught:
        safe_path(given, data_dir)
    assert says in str(caught.value)
    assert repr(given) in str(caught.value)


def test_absolute_path_outside_data_dir_is_refused(data_dir: Path) -> None:
    outside = data_dir.parent / "outside.csv"
    with pytest.raises(DataError, match="outside the data directory"):
        safe_path(outside, data_dir)
    with pytest.raises(DataError, match="outside the data directory"):
        safe_path("/etc/passwd", data_dir)


def test_safe_path_accepts_relative_and_absolute_paths_inside(data_dir: Path) -> None:
    assert safe_path("good.csv", data_dir) == data_dir / "good.csv"
    assert safe_path("sub/inner.csv", data_dir) == data_dir / "sub" / "inner.csv"
    assert safe_path(data_dir / "good.csv", data_dir) == data_dir / "good.csv"


def test_reading_a_fifo_is_refused_without_blocking(tmp_path: Path) -> None:
    fifo = tmp_path / "pipe.csv"
    os.mkfifo(fifo)
    with pytest.raises(DataError, match="not a regular file"):
        safe_path("pipe.csv", tmp_path)
    with pytest.raises(DataError, match="not a regular file"):
        read(fifo)


def test_reading_through_a_link_is_refused(data_dir: Path) -> None:
    with pytest.raises(DataError, match="cannot open"):
        read(data_dir / "link-in.csv")


def test_data_dir_reached_through_a_link_still_works(data_dir: Path, tmp_path: Path) -> None:
    alias = tmp_path / "alias"
    alias.symlink_to(data_dir, target_is_directory=True)
    assert safe_path("good.csv", alias) == data_dir / "good.csv"


# -- good files -----------------------------------------------------------------------------


def test_csv_and_parquet_load_to_the_same_arrays(tmp_path: Path) -> None:
    csv_path = tmp_path / "data.csv"
    csv_path.write_text(GOOD_CSV)
    parquet_path = tmp_path / "data.parquet"
    pq.write_table(pa.table({"x1": [1, 4, 7], "x2": [2.0, 5.0, 8.0], "Y": [3.0, 6.0, 9.5]}),
                   parquet_path)  # fmt: skip
    from_csv = read(csv_path)
    from_parquet = read(parquet_path)
    for table in (from_csv, from_parquet):
        assert table.columns == ["x1", "x2"]
        assert table.target == "Y"
        assert table.x.dtype == np.float64 and table.y.dtype == np.float64
    np.testing.assert_array_equal(from_csv.x, [[1, 2], [4, 5], [7, 8]])
    np.testing.assert_array_equal(from_csv.y, [3, 6, 9.5])
    np.testing.assert_array_equal(from_csv.x, from_parquet.x)
    np.testing.assert_array_equal(from_csv.y, from_parquet.y)


def test_csv_dialect_details_are_tolerated(tmp_path: Path) -> None:
    path = tmp_path / "data.txt"
    text = '\ufeffname, x2 ,x1,Y\r\n"a, b", 2 ,"1",3\r\n\r\nc,5,4,6e0\r\nd,-8,7,9\r\n\r\n'
    path.write_bytes(text.encode("utf-8"))
    table = read(path, features=["x1", "x2"])
    assert table.columns == ["x1", "x2"]
    np.testing.assert_array_equal(table.x, [[1, 2], [4, 5], [7, -8]])
    np.testing.assert_array_equal(table.y, [3, 6, 9])


def test_a_skipped_column_may_hold_text_but_a_chosen_one_may_not(tmp_path: Path) -> None:
    path = tmp_path / "data.csv"
    path.write_text("id,x1,Y\nr1,1,2\nr2,3,4\n")
    assert read(path, features=["x1"]).columns == ["x1"]
    with pytest.raises(DataError, match="column 'id', data row 1"):
        read(path)


def test_rows_are_counted_across_chunks(tmp_path: Path) -> None:
    rows = 70_000
    lines = ["x1,Y", *(f"{i},{2 * i}" for i in range(rows))]
    path = tmp_path / "big.csv"
    # A blank first line sends the file to the exact reader, which converts in chunks.
    path.write_text("\n" + "\n".join(lines) + "\n")
    table = read(path, max_rows=10**6)
    np.testing.assert_array_equal(table.y, 2 * np.arange(rows))
    lines[rows] = "oops,1"  # data row `rows`, on line rows + 2 after the blank line
    path.write_text("\n" + "\n".join(lines) + "\n")
    with pytest.raises(DataError, match=f"data row {rows} \\(line {rows + 2}\\)"):
        read(path, max_rows=10**6)


def test_fast_and_exact_csv_readers_give_identical_arrays(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    scaled = rng.normal(size=300) * 10.0 ** rng.integers(-300, 300, size=300)
    special = [0.0, -0.0, 5e-324, 2.2250738585072014e-308, 1.7976931348623157e308, 0.1, 1 / 3]
    values = [*scaled.tolist(), *special]
    formats = ["{!r}", "{:.17g}", "{:.3e}", "{:.20f}", "{:+.6E}"]
    cells = [formats[i % len(formats)].format(v) for i, v in enumerate(values)]
    body = "".join(f"{cell},{i}\n" for i, cell in enumerate(cells))
    fast = tmp_path / "fast.csv"
    fast.write_text("x1,Y\n" + body)
    exact = tmp_path / "exact.csv"
    exact.write_text("\nx1,Y\n" + body)  # a blank first line: only the exact reader takes it
    a, b = read(fast), read(exact)
    assert a.x.tobytes() == b.x.tobytes() and a.y.tobytes() == b.y.tobytes()
    np.testing.assert_array_equal(a.x[:, 0], [float(cell) for cell in cells])


# -- blobs ----------------------------------------------------------------------------------


def sample_table() -> Table:
    x = np.array([[0.1, -0.0], [1e-310, 1e308], [np.pi, -np.e]], dtype=np.float64)
    return Table(columns=["a", "é"], target="Y", x=x, y=np.array([1 / 3, 2.0, -7.25]))


def test_encode_decode_round_trips_exactly() -> None:
    table = sample_table()
    back = decode(encode(table))
    assert back.columns == table.columns and back.target == table.target
    assert back.x.tobytes() == table.x.tobytes()
    assert back.y.tobytes() == table.y.tobytes()
    assert back.x.dtype == np.float64 and back.x.flags.c_contiguous


def test_digest_is_stable_and_content_addressed() -> None:
    blob = encode(sample_table())
    assert encode(sample_table()) == blob
    assert digest(blob) == digest(encode(sample_table())) == hashlib.sha256(blob).hexdigest()
    changed = sample_table()
    changed.y[0] = np.nextafter(changed.y[0], 1.0)
    renamed = Table(["a", "b"], "Y", sample_table().x, sample_table().y)
    retargeted = Table(["a", "é"], "Z", sample_table().x, sample_table().y)
    digests = {digest(encode(t)) for t in (sample_table(), changed, renamed, retargeted)}
    assert len(digests) == 4


def _touch(path: str) -> None:
    Path(path).touch()


class Payload:
    """Unpickling this creates a file: proof that code ran."""

    def __init__(self, sentinel: Path) -> None:
        self.sentinel = sentinel

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (_touch, (str(self.sentinel),))


def framed(body: bytes, columns: list[str] | None = None, rows: int = 1) -> bytes:
    header = json.dumps({"columns": columns or [], "target": "Y", "rows": rows}).encode()
    return BLOB_MAGIC + struct.pack(">I", len(header)) + header + body


def test_decode_never_unpickles(tmp_path: Path) -> None:
    sentinel = tmp_path / "ran"
    # The payload is live: plain unpickling runs it.
    pickle.loads(pickle.dumps(Payload(sentinel)))
    assert sentinel.exists()
    sentinel.unlink()

    npy = io.BytesIO()
    np.save(npy, np.array([Payload(sentinel)], dtype=object), allow_pickle=True)
    blobs = [
        pickle.dumps(Payload(sentinel)),
        framed(npy.getvalue()),
        framed(pickle.dumps(Payload(sentinel))),
    ]
    for blob in blobs:
        with pytest.raises(DataError):
            decode(blob)
    assert not sentinel.exists()


def test_decode_refuses_malformed_blobs() -> None:
    good = encode(sample_table())
    ints = io.BytesIO()
    np.save(ints, np.zeros((1, 1), dtype=np.int64))
    floats = io.BytesIO()
    np.save(floats, np.zeros((1, 1)))
    for blob in [
        b"",
        b"NOTATABLE",
        good[: len(BLOB_MAGIC) + 2],
        good[:-1],
        good + b"\0",
        framed(b"{}"),
        framed(ints.getvalue()),
        framed(floats.getvalue(), columns=["a"]),
        BLOB_MAGIC + struct.pack(">I", 2) + b"[]",
    ]:
        with pytest.raises(DataError, match="dataset blob"):
            decode(blob)
    assert decode(framed(floats.getvalue())).columns == []
