"""Write tables (lists of flat dicts) to CSV, Parquet or Markdown."""

from __future__ import annotations

import csv
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from salience.errors import SalienceError

FORMATS = ("csv", "parquet")


def _flat(value: Any) -> Any:
    """Scalars stay; dicts and lists become JSON text (CSV and Parquet columns must be flat)."""
    if isinstance(value, (dict, list, tuple)):
        return json.dumps(value, default=str)
    return value


def _columns(rows: Sequence[dict[str, Any]]) -> list[str]:
    return list(dict.fromkeys(key for row in rows for key in row))


def write_csv(rows: Sequence[dict[str, Any]], path: Path, columns: Sequence[str] | None = None) -> Path:
    columns = list(columns or _columns(rows))
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow({k: _flat(row.get(k)) for k in columns})
    return path


def write_parquet(rows: Sequence[dict[str, Any]], path: Path, columns: Sequence[str] | None = None) -> Path:
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        raise SalienceError("Parquet export needs pyarrow (pip install pyarrow); or use --format csv") from None
    columns = list(columns or _columns(rows))
    table = pa.table({k: [_flat(row.get(k)) for row in rows] for k in columns})
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path)
    return path


def write_table(rows: Sequence[dict[str, Any]], path: str | Path, fmt: str, columns: Sequence[str] | None = None) -> Path:
    """Write ``rows`` as ``fmt`` ("csv" or "parquet") to ``path``."""
    if fmt not in FORMATS:
        raise SalienceError(f"unknown export format {fmt!r}; choose {' or '.join(FORMATS)}")
    writer = write_csv if fmt == "csv" else write_parquet
    return writer(rows, Path(path), columns)


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A GitHub-flavoured Markdown table (``|`` in cells escaped)."""
    def line(cells: Sequence[str]) -> str:
        return "| " + " | ".join(str(c).replace("|", "\\|") for c in cells) + " |"

    return "\n".join([line(header), line(["---"] * len(header)), *(line(r) for r in rows)]) + "\n"
