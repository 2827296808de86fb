"""Leaderboards: one CSV per protocol in ``leaderboards/``, rows scored by the evaluator (``source = verified``) or
copied from the literature (``source = reported``, with the paper). Writes are atomic; the Markdown views are
regenerated from the CSVs."""

from __future__ import annotations

import csv
import datetime as _dt
import io
import math
import os
from pathlib import Path
from typing import Any

from fer_bench import __version__
from fer_bench._io import atomic_write_text
from fer_bench.errors import ConfigError, DataError

COLUMNS: tuple[str, ...] = (
    "rank",
    "model",
    "backbone",
    "params_m",
    "pretrain",
    "acc",
    "acc_ci_low",
    "acc_ci_high",
    "mean_class_acc",
    "macro_f1",
    "ece",
    "worst_group_acc",
    "max_group_gap",
    "eq_opp_gap",
    "dataset_hash",
    "submission_sha256",
    "fer_bench_version",
    "date",
    "source",
    "reference",
)
NUMERIC: tuple[str, ...] = ("params_m", *COLUMNS[COLUMNS.index("acc") : COLUMNS.index("dataset_hash")])
LEADERBOARDS_DIR = Path(__file__).resolve().parents[2] / "leaderboards"


def leaderboard_path(protocol: str, directory: str | os.PathLike | None = None) -> Path:
    return Path(directory or LEADERBOARDS_DIR) / f"{protocol}.csv"


def read_leaderboard(path: str | os.PathLike) -> list[dict[str, str]]:
    """Rows of a leaderboard CSV (an absent file is an empty board); a foreign header is an error."""
    path = Path(path)
    if not path.is_file():
        return []
    reader = csv.DictReader(io.StringIO(path.read_text()))
    if tuple(reader.fieldnames or ()) != COLUMNS:
        raise DataError(f"{path}: not a fer_bench leaderboard (header {reader.fieldnames}, expected {list(COLUMNS)})")
    return list(reader)


def _number(value: Any) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return -math.inf
    return number if math.isfinite(number) else -math.inf


def ranked(rows: list[dict[str, str]], sort: str = "acc") -> list[dict[str, str]]:
    """Rows ordered by ``sort`` (descending for scores, ascending for gaps and ECE), ranks renumbered."""
    if sort not in COLUMNS:
        raise ConfigError(f"--sort {sort!r}: expected one of {list(COLUMNS)}")
    ascending = sort in ("ece", "max_group_gap", "eq_opp_gap", "rank")
    key = (lambda r: -_number(r[sort])) if not ascending else (lambda r: _number(r[sort]) if r[sort] else math.inf)
    if sort not in NUMERIC and sort != "rank":
        key = lambda r: r[sort]  # noqa: E731
    out = sorted(rows, key=key)
    by_acc = sorted(out, key=lambda r: -_number(r["acc"]))
    for rank, row in enumerate(by_acc, start=1):
        row["rank"] = str(rank)
    return out


def _csv_text(rows: list[dict[str, str]]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows({c: row.get(c, "") for c in COLUMNS} for row in rows)
    return buffer.getvalue()


def _fmt(value: str, scale: float = 100.0) -> str:
    number = _number(value)
    return f"{number * scale:.2f}" if number != -math.inf else ""


def _md_cell(value: str) -> str:
    """A table cell that cannot break the table: ``|`` escaped, line breaks made spaces."""
    return " ".join(str(value).split()).replace("|", "\\|")


def safe_text(value: Any) -> str:
    """User text for a CSV cell: one line, and never read as a formula by a spreadsheet (a leading =, +, -, @ or
    tab gets a quote, as OWASP's CSV-injection advice says)."""
    text = " ".join(str(value or "").split())
    return "'" + text if text[:1] in ("=", "+", "-", "@", "\t", "\r") else text


def markdown_table(protocol: str, rows: list[dict[str, str]]) -> str:
    lines = [
        f"# Leaderboard: {protocol}",
        "",
        "Generated from `"
        + f"{protocol}.csv"
        + "` by `ferbench leaderboard`; do not edit by hand. `verified` rows were "
        "scored by fer_bench from a submission (dataset hash and file hash recorded); `reported` rows are copied "
        "from the paper named, under that paper's own protocol.",
        "",
        "| rank | model | backbone | pretrain | acc % (95 % CI) | mean class acc % | macro-F1 % | ECE "
        "| worst-group acc % | max group gap | source |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in ranked(rows):
        ci = f" ({_fmt(row['acc_ci_low'])}–{_fmt(row['acc_ci_high'])})" if row["acc_ci_low"] else ""
        source = _md_cell(row["source"] + (f": {row['reference']}" if row["reference"] else ""))
        model, backbone, pretrain = (_md_cell(row[k]) for k in ("model", "backbone", "pretrain"))
        lines.append(
            f"| {row['rank']} | {model} | {backbone} | {pretrain} | {_fmt(row['acc'])}{ci} | "
            f"{_fmt(row['mean_class_acc'])} | {_fmt(row['macro_f1'])} | {_fmt(row['ece'], 1)} | "
            f"{_fmt(row['worst_group_acc'])} | {_fmt(row['max_group_gap'], 1)} | {source} |"
        )
    return "\n".join(lines) + "\n"


def regenerate_views(directory: str | os.PathLike | None = None) -> None:
    """Rewrite ``<protocol>.md`` for every CSV and the index table in ``README.md`` between its markers."""
    directory = Path(directory or LEADERBOARDS_DIR)
    summary = ["| protocol | entries | best acc % | best model |", "|---|---|---|---|"]
    for path in sorted(directory.glob("*.csv")):
        rows = read_leaderboard(path)
        atomic_write_text(path.with_suffix(".md"), markdown_table(path.stem, rows))
        best = ranked(rows)[0] if rows else None
        summary.append(
            f"| [{path.stem}]({path.stem}.md) | {len(rows)} | {_fmt(best['acc']) if best else ''} | "
            f"{best['model'] if best else ''} |"
        )
    readme = directory / "README.md"
    start, end = "<!-- leaderboards:start -->", "<!-- leaderboards:end -->"
    text = readme.read_text() if readme.is_file() else f"# Leaderboards\n\n{start}\n{end}\n"
    if start not in text or end not in text:
        text = text.rstrip() + f"\n\n{start}\n{end}\n"
    head, rest = text.split(start, 1)
    _, tail = rest.split(end, 1)
    atomic_write_text(readme, head + start + "\n" + "\n".join(summary) + "\n" + end + tail)


def entry_from_results(results: dict[str, Any], meta: dict[str, Any], submission_sha256: str) -> dict[str, str]:
    """A verified leaderboard row from evaluator results and the submission's metadata."""
    m, ci = results["metrics"], results.get("ci") or {}

    def num(value: Any) -> str:
        return "" if value is None or (isinstance(value, float) and not math.isfinite(value)) else f"{value:.6g}"

    fairness = [f for column, f in (results.get("fairness") or {}).items() if "+" not in column]
    worst = [f["worst_group_acc"]["value"] for f in fairness if f["worst_group_acc"]["value"] is not None]
    gaps = [f["max_gap"]["value"] for f in fairness if f["max_gap"]["value"] is not None]
    eq_opp = [f["eq_opp_gap"]["value"] for f in fairness if f["eq_opp_gap"]["value"] is not None]
    finite = lambda values: [v for v in values if isinstance(v, float | int) and math.isfinite(v)]  # noqa: E731
    return {
        "rank": "",
        "model": safe_text(meta["model"]),
        "backbone": safe_text(meta.get("backbone")),
        "params_m": num(meta.get("params_m")),
        "pretrain": safe_text(meta.get("pretrain")),
        "acc": num(m["acc"]),
        "acc_ci_low": num(ci.get("acc", [None])[0]),
        "acc_ci_high": num(ci.get("acc", [None, None])[1]),
        "mean_class_acc": num(m["mean_class_acc"]),
        "macro_f1": num(m["macro_f1"]),
        "ece": num(m.get("ece")),
        "worst_group_acc": num(min(finite(worst))) if finite(worst) else "",
        "max_group_gap": num(max(finite(gaps))) if finite(gaps) else "",
        "eq_opp_gap": num(max(finite(eq_opp))) if finite(eq_opp) else "",
        "dataset_hash": results["dataset_hash"],
        "submission_sha256": submission_sha256,
        "fer_bench_version": __version__,
        "date": _dt.date.today().isoformat(),
        "source": "verified",
        "reference": safe_text(meta.get("paper") or meta.get("code")),
    }


def add_entry(path: str | os.PathLike, entry: dict[str, str]) -> list[dict[str, str]]:
    """Add a row to the leaderboard at ``path`` (atomic rewrite); a second row with the same submission hash is
    refused. Returns the ranked rows."""
    path = Path(path)
    rows = read_leaderboard(path)
    if any(r["submission_sha256"] == entry["submission_sha256"] for r in rows if r["submission_sha256"]):
        raise DataError(f"{path}: this submission (sha256 {entry['submission_sha256'][:12]}…) is already on the board")
    rows = ranked([*rows, entry])
    atomic_write_text(path, _csv_text(rows))
    regenerate_views(path.parent)
    return rows
