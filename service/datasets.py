"""Data files: find them safely, read them strictly, and store them as content-addressed blobs.

Rows in messages are data rows counted from 1, the header not counted; a CSV message also gives
the line of the file (the header is line 1), which is the row number a spreadsheet shows.
No torch here: the client imports this module.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import math
import os
import stat
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from service.errors import DataError, LimitError

Array = npt.NDArray[np.float64]

CSV_SUFFIXES = (".csv", ".txt")
PARQUET_SUFFIXES = (".parquet", ".pq")
#: First bytes of every encoded table; the digit is the format version.
BLOB_MAGIC = b"LRQTABLE1\n"
#: A blob's JSON header larger than this is refused before it is parsed.
MAX_BLOB_HEADER_BYTES = 16 * 1024 * 1024
#: Records converted to floats at a time, so memory stays near the size of the result.
_CHUNK_ROWS = 65_536


@dataclass(frozen=True)
class Table:
    """A dataset ready to train on: feature columns in order, the target, and float64 arrays."""

    columns: list[str]
    target: str
    x: Array
    y: Array

    @property
    def n_rows(self) -> int:
        return int(self.x.shape[0])


# -- finding a file -------------------------------------------------------------------------


def safe_path(path: str | Path, data_dir: Path, *, base: Path | None = None) -> Path:
    """The regular file ``path`` names inside ``data_dir``, refusing anything that could escape.

    A relative path is taken from ``base`` (a spec file's directory), else from ``data_dir``.
    """
    shown = str(path)
    given = Path(path)
    if ".." in given.parts:
        raise DataError(f"data.path {shown!r}: '..' is not allowed")
    root = data_dir.resolve()
    candidate = given if given.is_absolute() else (base or root) / given
    tried = str(candidate)
    if not candidate.is_relative_to(root):
        raise DataError(f"data.path {shown!r}: {tried} is outside the data directory {str(root)!r}")
    # Walk down from the root with lstat so that no link, at any depth, is followed.
    current = root
    for part in candidate.relative_to(root).parts:
        current = current / part
        try:
            info = current.lstat()
        except FileNotFoundError:
            raise DataError(f"data.path {shown!r}: no such file (looked for {tried})") from None
        except OSError as exc:
            raise DataError(f"data.path {shown!r}: cannot read {tried} ({exc.strerror})") from None
        except ValueError:
            raise DataError(f"data.path {shown!r}: not a valid file name") from None
        if stat.S_ISLNK(info.st_mode):
            raise DataError(f"data.path {shown!r}: symbolic links are not allowed ({current})")
    if current == root or not stat.S_ISREG(current.lstat().st_mode):
        raise DataError(f"data.path {shown!r}: not a regular file ({tried})")
    if not current.resolve().is_relative_to(root):
        raise DataError(f"data.path {shown!r}: {tried} is outside the data directory {str(root)!r}")
    return current


def _read_bytes(path: Path, max_bytes: int) -> bytes:
    # O_NOFOLLOW and fstat on the open descriptor: the file checked is the file read.
    # O_NONBLOCK: opening a FIFO put in a file's place must not hang the reader.
    flags = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0)
    try:
        fd = os.open(path, flags)
    except OSError as exc:
        raise DataError(f"{path.name}: cannot open ({exc.strerror})") from None
    with os.fdopen(fd, "rb") as handle:
        info = os.fstat(handle.fileno())
        if not stat.S_ISREG(info.st_mode):
            raise DataError(f"{path.name}: not a regular file")
        # A second name for the file may be a hard link made to a file outside the data
        # directory, which no walk of this path can tell: only single-named files are read.
        if info.st_nlink > 1:
            raise DataError(
                f"{path}: a file with {info.st_nlink} hard links is not read; "
                "copy it into the data directory"
            )
        if info.st_size > max_bytes:
            raise LimitError(
                f"{path.name}: {info.st_size} bytes, more than the limit of {max_bytes} "
                "(max_dataset_bytes)"
            )
        # One byte past the limit tells a file that grew since fstat.
        raw = handle.read(max_bytes + 1)
    if len(raw) > max_bytes:
        raise LimitError(f"{path.name}: more than the limit of {max_bytes} bytes")
    return raw


def check_label(value: str, field: str) -> str:
    """A dataset name, target or feature the database can store, or DataError naming the field."""
    from service.spec import MAX_NAME_LENGTH, text_problem

    problem = text_problem(value)
    if problem is None and not value:
        problem = "must not be empty"
    if problem is None and len(value) > MAX_NAME_LENGTH:
        problem = f"{len(value)} characters, more than {MAX_NAME_LENGTH}"
    if problem is not None:
        shown = f"{value!a}" if len(value) <= 40 else f"{value[:37]!a}..."
        raise DataError(f"{field} {shown}: {problem}")
    return value


def split_features(text: str, field: str = "--features") -> list[str]:
    """Comma-separated feature names, each storable and none repeated."""
    names = [check_label(name.strip(), field) for name in text.split(",")]
    for i, name in enumerate(names):
        if name in names[:i]:
            raise DataError(f"{field}: {name!r} is given twice")
    return names


# -- reading a table ------------------------------------------------------------------------


def read_table(
    path: Path,
    *,
    target: str,
    features: list[str] | None,
    max_bytes: int,
    max_rows: int,
    max_features: int,
) -> Table:
    """Read a CSV or Parquet file into a Table, refusing anything that is not clean numbers."""
    suffix = path.suffix.lower()
    if suffix not in CSV_SUFFIXES + PARQUET_SUFFIXES:
        raise DataError(
            f"{path.name}: unknown file type {path.suffix!r}; "
            f"expected one of {', '.join(CSV_SUFFIXES + PARQUET_SUFFIXES)}"
        )
    raw = _read_bytes(path, max_bytes)
    if not raw or raw.isspace():
        raise DataError(f"{path.name}: empty file")
    reader = _Reader(
        path.name, target=target, features=features, max_rows=max_rows, max_features=max_features
    )
    table = reader.parse_csv(raw) if suffix in CSV_SUFFIXES else reader.parse_parquet(raw)
    n, d = table.x.shape
    if n < 2:
        raise DataError(f"{path.name}: {n} data row; need at least 2")
    if d > n:
        raise DataError(
            f"{path.name}: {d} feature columns but only {n} data rows; "
            "need at least as many rows as features"
        )
    return table


class _Reader:
    """Column choice and checks shared by the CSV and Parquet readers."""

    def __init__(
        self,
        name: str,
        *,
        target: str,
        features: list[str] | None,
        max_rows: int,
        max_features: int,
    ) -> None:
        self.name = name
        self.target = target
        self.features = features
        self.max_rows = max_rows
        self.max_features = max_features

    def choose(self, header: Sequence[str]) -> list[str]:
        """The feature columns, after checking the header."""
        seen: set[str] = set()
        for position, column in enumerate(header, start=1):
            if not column:
                raise DataError(f"{self.name}: column {position} of the header has no name")
            if column in seen:
                raise DataError(f"{self.name}: column {column!r} appears twice in the header")
            seen.add(column)
        available = ", ".join(header) if len(header) <= 20 else ", ".join(header[:20]) + ", ..."
        if self.target not in seen:
            raise DataError(
                f"{self.name}: no column {self.target!r} (the target); columns: {available}"
            )
        if self.features is None:
            chosen = [c for c in header if c != self.target]
        else:
            for column in self.features:
                if column == self.target:
                    raise DataError(
                        f"{self.name}: column {column!r} is the target and cannot be a feature"
                    )
                if column not in seen:
                    raise DataError(
                        f"{self.name}: no column {column!r} (a feature); columns: {available}"
                    )
            chosen = list(self.features)
        if not chosen:
            raise DataError(f"{self.name}: no feature columns besides the target {self.target!r}")
        if len(set(chosen)) != len(chosen):
            raise DataError(f"{self.name}: a feature column is named twice")
        for column in [self.target, *chosen]:
            check_label(column, f"{self.name}: column")
        if len(chosen) > self.max_features:
            raise LimitError(
                f"{self.name}: {len(chosen)} feature columns, more than the limit of "
                f"{self.max_features} (max_features)"
            )
        return chosen

    def too_many_rows(self) -> LimitError:
        return LimitError(f"{self.name}: more than {self.max_rows} data rows, the limit (max_rows)")

    def at(self, column: str, row: int, line: int | None = None) -> str:
        where = f"{self.name}: column {column!r}, data row {row}"
        return f"{where} (line {line})" if line is not None else where

    def check_finite(
        self, column: str, values: Array, first_row: int, lines: Sequence[int] | None
    ) -> None:
        bad = np.flatnonzero(~np.isfinite(values))
        if bad.size:
            i = int(bad[0])
            value = float(values[i])
            kind = "NaN" if math.isnan(value) else "infinite"
            line = lines[i] if lines is not None else None
            raise DataError(f"{self.at(column, first_row + i, line)}: {kind} ({value!r})")

    # -- CSV --

    def parse_csv(self, raw: bytes) -> Table:
        try:
            # utf-8-sig: spreadsheets often start a UTF-8 CSV with a byte-order mark.
            text = raw.decode("utf-8-sig")
        except UnicodeDecodeError as exc:
            line = raw[: exc.start].count(b"\n") + 1
            raise DataError(
                f"{self.name}: not UTF-8 text (line {line}, byte {exc.start})"
            ) from None
        fast = self._parse_fast(raw, text[: text.find("\n") + 1] or text)
        if fast is not None:
            return fast
        records = csv.reader(io.StringIO(text, newline=""), strict=True)
        try:
            return self._parse_records(records)
        except csv.Error as exc:
            raise DataError(
                f"{self.name}: line {records.line_num}: not valid CSV ({exc})"
            ) from None

    def _parse_fast(self, raw: bytes, first_line: str) -> Table | None:
        """The table via pyarrow's CSV reader, or None to let the exact reader find the fault.

        Both readers parse a number to the nearest double, so a file either accepts gives the
        same arrays; pyarrow's messages lack the row and line, hence the second pass on failure.
        """
        import pyarrow as pa
        import pyarrow.csv as pacsv

        try:
            header = next(csv.reader([first_line], strict=True), None)
        except csv.Error:
            return None  # e.g. a quoted name that runs onto the next line
        if not header:
            return None
        header = [cell.strip() for cell in header]
        chosen = self.choose(header)
        # Positional names: the real ones were checked above and may be awkward for pyarrow.
        names = [f"c{i}" for i in range(len(header))]
        used = [names[header.index(c)] for c in [*chosen, self.target]]
        try:
            data = pacsv.read_csv(
                pa.BufferReader(raw),
                read_options=pacsv.ReadOptions(column_names=names, skip_rows=1),
                parse_options=pacsv.ParseOptions(newlines_in_values=False),
                convert_options=pacsv.ConvertOptions(
                    column_types={name: pa.float64() for name in used},
                    include_columns=used,
                    null_values=[],
                    strings_can_be_null=False,
                    quoted_strings_can_be_null=False,
                ),
            )
        except (pa.ArrowException, ValueError):
            return None
        n = int(data.num_rows)
        if n == 0:
            return None
        if n > self.max_rows:
            raise self.too_many_rows()
        matrix = np.empty((n, len(used)), dtype=np.float64)
        for j, name in enumerate(used):
            column = data.column(name)
            if column.null_count:
                return None
            matrix[:, j] = column.to_numpy()
        if not np.isfinite(matrix).all():
            return None
        return Table(
            columns=chosen,
            target=self.target,
            x=np.ascontiguousarray(matrix[:, :-1]),
            y=np.ascontiguousarray(matrix[:, -1]),
        )

    def _parse_records(self, records: Any) -> Table:
        header: list[str] | None = None
        for record in records:
            if record:
                header = [cell.strip() for cell in record]
                break
        if header is None:
            raise DataError(f"{self.name}: empty file")
        chosen = self.choose(header)
        names = [*chosen, self.target]
        positions = [header.index(c) for c in names]
        width = len(header)
        blocks: list[Array] = []
        chunk: list[list[str]] = [[] for _ in names]
        lines: list[int] = []
        rows = 0
        for record in records:
            if not record:
                continue  # a blank line, as pandas skips them
            rows += 1
            if len(record) != width:
                raise DataError(
                    f"{self.name}: data row {rows} (line {records.line_num}): "
                    f"{len(record)} fields, but the header has {width}"
                )
            if rows > self.max_rows:
                raise self.too_many_rows()
            for cells, position in zip(chunk, positions, strict=True):
                cells.append(record[position])
            lines.append(records.line_num)
            if len(lines) == _CHUNK_ROWS:
                blocks.append(self._convert(names, chunk, lines, rows - len(lines) + 1))
                chunk = [[] for _ in names]
                lines = []
        if rows == 0:
            raise DataError(f"{self.name}: a header and no data rows")
        if lines:
            blocks.append(self._convert(names, chunk, lines, rows - len(lines) + 1))
        matrix = np.vstack(blocks)
        return Table(
            columns=chosen,
            target=self.target,
            x=np.ascontiguousarray(matrix[:, :-1]),
            y=np.ascontiguousarray(matrix[:, -1]),
        )

    def _convert(
        self, names: list[str], chunk: list[list[str]], lines: list[int], first_row: int
    ) -> Array:
        block = np.empty((len(lines), len(names)), dtype=np.float64)
        for j, (column, cells) in enumerate(zip(names, chunk, strict=True)):
            try:
                block[:, j] = list(map(float, cells))
            except ValueError:
                self._refuse_cell(column, cells, lines, first_row)
            self.check_finite(column, block[:, j], first_row, lines)
        return block

    def _refuse_cell(self, column: str, cells: list[str], lines: list[int], first_row: int) -> None:
        for i, cell in enumerate(cells):
            try:
                float(cell)
            except ValueError:
                where = self.at(column, first_row + i, lines[i])
                if not cell.strip():
                    raise DataError(f"{where}: empty cell") from None
                shown = cell if len(cell) <= 40 else cell[:37] + "..."
                raise DataError(f"{where}: not a number: {shown!r}") from None

    # -- Parquet --

    def parse_parquet(self, raw: bytes) -> Table:
        import pyarrow as pa
        import pyarrow.parquet as pq

        try:
            parquet = pq.ParquetFile(pa.BufferReader(raw))
            header = list(parquet.schema_arrow.names)
            n = int(parquet.metadata.num_rows)
        except (pa.ArrowException, OSError, ValueError) as exc:
            raise DataError(f"{self.name}: not a readable Parquet file ({exc})") from None
        chosen = self.choose(header)
        if n == 0:
            raise DataError(f"{self.name}: a header and no data rows")
        if n > self.max_rows:
            raise self.too_many_rows()
        names = [*chosen, self.target]
        try:
            data = parquet.read(columns=names)
        except (pa.ArrowException, OSError, ValueError) as exc:
            raise DataError(f"{self.name}: not a readable Parquet file ({exc})") from None
        matrix = np.empty((n, len(names)), dtype=np.float64)
        for j, column in enumerate(names):
            values = data.column(column)
            kind = values.type
            if not (pa.types.is_integer(kind) or pa.types.is_floating(kind)):
                raise DataError(f"{self.name}: column {column!r}: type {kind} is not numeric")
            if values.null_count:
                missing = np.asarray(values.is_null().to_numpy(zero_copy_only=False))
                row = int(np.flatnonzero(missing)[0]) + 1
                raise DataError(f"{self.at(column, row)}: empty cell (null)")
            matrix[:, j] = values.to_numpy()
            self.check_finite(column, matrix[:, j], 1, None)
        return Table(
            columns=chosen,
            target=self.target,
            x=np.ascontiguousarray(matrix[:, :-1]),
            y=np.ascontiguousarray(matrix[:, -1]),
        )


# -- blobs ----------------------------------------------------------------------------------


def encode(table: Table) -> bytes:
    """The table as bytes: magic, a length-prefixed JSON header, then the .npy of [x | y]."""
    n = table.n_rows
    if table.x.shape != (n, len(table.columns)) or table.y.shape != (n,):
        raise ValueError(
            f"table arrays {table.x.shape} and {table.y.shape} do not match "
            f"{len(table.columns)} columns"
        )
    header = json.dumps(
        {"columns": list(table.columns), "target": table.target, "rows": n},
        sort_keys=True,
        separators=(",", ":"),
        ensure_ascii=False,
    ).encode("utf-8")
    # Little-endian on every host, so the same table has the same digest everywhere.
    matrix = np.ascontiguousarray(np.column_stack([table.x, table.y]), dtype="<f8")
    out = io.BytesIO()
    out.write(BLOB_MAGIC)
    out.write(struct.pack(">I", len(header)))
    out.write(header)
    np.save(out, matrix, allow_pickle=False)
    return out.getvalue()


def decode(blob: bytes) -> Table:
    """The table a blob holds; never unpickles anything."""
    if not blob.startswith(BLOB_MAGIC):
        raise DataError("dataset blob: not an lrq table (bad magic)")
    start = len(BLOB_MAGIC) + 4
    if len(blob) < start:
        raise DataError("dataset blob: truncated header")
    (size,) = struct.unpack(">I", blob[len(BLOB_MAGIC) : start])
    if size > MAX_BLOB_HEADER_BYTES or len(blob) < start + size:
        raise DataError("dataset blob: truncated or oversized header")
    try:
        header = json.loads(blob[start : start + size].decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        raise DataError("dataset blob: header is not JSON") from None
    columns = header.get("columns") if isinstance(header, dict) else None
    target = header.get("target") if isinstance(header, dict) else None
    rows = header.get("rows") if isinstance(header, dict) else None
    if (
        not isinstance(columns, list)
        or not all(isinstance(c, str) for c in columns)
        or not isinstance(target, str)
        or not isinstance(rows, int)
    ):
        raise DataError("dataset blob: header lacks columns, target or rows")
    body = io.BytesIO(blob[start + size :])
    try:
        # read_array, not np.load: np.load would also open zip and pickle payloads.
        matrix = np.lib.format.read_array(body, allow_pickle=False)
    except (ValueError, OSError, EOFError) as exc:
        raise DataError(f"dataset blob: not a float64 array ({exc})") from None
    if body.read(1):
        raise DataError("dataset blob: trailing bytes after the array")
    expected = (rows, len(columns) + 1)
    if matrix.dtype.kind != "f" or matrix.dtype.itemsize != 8 or matrix.shape != expected:
        raise DataError(
            f"dataset blob: array {matrix.dtype} {matrix.shape} does not match "
            f"{rows} rows of {len(columns)} columns and a target"
        )
    matrix = matrix.astype(np.float64, copy=False)
    return Table(
        columns=list(columns),
        target=target,
        x=np.ascontiguousarray(matrix[:, :-1]),
        y=np.ascontiguousarray(matrix[:, -1]),
    )


def digest(blob: bytes) -> str:
    """The blob's content address: sha256, hex."""
    return hashlib.sha256(blob).hexdigest()
