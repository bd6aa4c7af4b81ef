"""How the CLI shows things: tables and records on stdout, one-line errors on stderr, result files.

User text (labels, captions, paths) is always printed literally: the consoles parse no markup."""

from __future__ import annotations

import csv
import io
import json
import math
import os
import sys
import tempfile
from enum import Enum
from pathlib import Path

from rich.console import Console
from rich.table import Table
from rich.text import Text

from diffscore.errors import EngineError

out = Console(markup=False, highlight=False, soft_wrap=True)
err = Console(stderr=True, markup=False, highlight=False, soft_wrap=True)


class Format(str, Enum):
    table = "table"
    json = "json"
    jsonl = "jsonl"
    csv = "csv"


OUTPUT_SUFFIXES = {".json": Format.json, ".jsonl": Format.jsonl, ".csv": Format.csv}


def error_line(message: str) -> None:
    """The one line every mistake gets: 'error: ...' on stderr."""
    err.print(Text.assemble(("error: ", "bold red"), " ".join(str(message).split("\n"))))


def say(*parts) -> None:
    """A line on stdout; a (text, style) tuple is styled, everything else printed as is."""
    out.print(Text.assemble(*(p if isinstance(p, tuple) else str(p) for p in parts)))


def output_format(path: Path | None) -> Format | None:
    """The file format an -o/--output path asks for, checked before any work starts."""
    if path is None:
        return None
    fmt = OUTPUT_SUFFIXES.get(path.suffix.lower())
    if fmt is None:
        raise EngineError(f"--output {path}: unknown extension {path.suffix!r}; use .json, .jsonl or .csv")
    if not path.parent.exists():
        raise EngineError(f"--output {path}: folder {path.parent} does not exist")
    return fmt


def cell(value) -> str:
    if isinstance(value, float):
        return "–" if math.isnan(value) else f"{value:.4g}"
    return str(value)


def flat(row: dict) -> dict:
    """A row for csv/table: nested values (rankings, options) as compact JSON."""
    return {k: json.dumps(v) if isinstance(v, (list, dict, tuple)) else v for k, v in row.items()}


def csv_row(row: dict) -> dict:
    """A row for a CSV file: a ranking as one column per rank (`rank1`, `rank1 score`, ...), a dict of scores
    as one column per key, anything else nested as compact JSON."""
    cells = {}
    for key, value in row.items():
        if key == "ranking" and isinstance(value, list):
            for i, (label, score, *_) in enumerate(value, 1):
                cells.update({f"rank{i}": label, f"rank{i} score": score})
        elif key == "scores" and isinstance(value, dict):
            cells.update(value)
        else:
            cells[key] = json.dumps(value) if isinstance(value, (list, dict, tuple)) else value
    return cells


def render(rows: list[dict], fmt: Format) -> str:
    if fmt is Format.json:
        return json.dumps(rows, indent=1) + "\n"
    if fmt is Format.jsonl:
        return "".join(json.dumps(r) + "\n" for r in rows)
    buf = io.StringIO()
    cells = [csv_row(r) for r in rows]
    writer = csv.DictWriter(buf, fieldnames=list(dict.fromkeys(k for c in cells for k in c)))
    writer.writeheader()
    writer.writerows(cells)
    return buf.getvalue()


def emit(rows: list[dict], fmt: Format = Format.table, title: str = "") -> None:
    """Rows on stdout: a table for people, json/jsonl/csv for programs."""
    if fmt is not Format.table:
        sys.stdout.write(render(rows, fmt))
        return
    table = Table(title=title or None)
    if rows:
        for key in rows[0]:
            table.add_column(key, justify="right" if isinstance(rows[0][key], (int, float)) else "left")
    for row in rows:
        table.add_row(*(Text(cell(v)) for v in flat(row).values()))
    out.print(table)


def write_rows(rows: list[dict], path: Path) -> None:
    """Write rows to `path` atomically (a temporary file beside it, then rename): never half a file."""
    fmt = output_format(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        # a CSV file starts with a UTF-8 BOM, so spreadsheet programs read its labels and captions as UTF-8
        with os.fdopen(fd, "w", newline="", encoding="utf-8-sig" if fmt is Format.csv else "utf-8") as f:
            f.write(render(rows, fmt))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
