"""Leaderboards: one CSV per protocol in a boards folder, rows scored by the evaluator (``source = verified``) or
copied from the literature (``source = reported``, with the paper). Writes are atomic; the Markdown views are
regenerated from the CSVs.

fer_bench ships the boards (``leaderboards/`` of the repository, carried by the wheel: :func:`shipped_boards`), and
never writes there once installed. Submissions go to a folder the user owns (:func:`boards_to_write`): ``--boards``,
or ``./leaderboards`` when the current folder has one (the repository checkout); a board missing there is seeded
from the shipped one (its reported rows) on the first submission (:func:`seed_board`)."""

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
from fer_bench.shipped import is_inside_package, shipped_dir

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
#: The boards folder of the current directory, used when no --boards is given and it exists.
LOCAL_BOARDS = Path("leaderboards")


def shipped_boards() -> Path:
    """The leaderboards fer_bench ships (read-only once installed)."""
    return shipped_dir("leaderboards")


def leaderboard_path(protocol: str, directory: str | os.PathLike) -> Path:
    """``<directory>/<protocol>.csv``."""
    return Path(directory) / f"{protocol}.csv"


def boards_to_read(boards: str | os.PathLike | None = None) -> Path:
    """The folder ``leaderboard show`` reads: ``boards`` when given, else ``./leaderboards`` when the current
    folder has one, else the shipped boards."""
    if boards is not None:
        return Path(boards)
    return LOCAL_BOARDS if LOCAL_BOARDS.is_dir() else shipped_boards()


def boards_to_write(boards: str | os.PathLike | None = None) -> Path:
    """The folder a submission goes to: ``boards`` when given, else ``./leaderboards`` when the current folder has
    one. Never a folder inside the installed package.

    Raises:
        ConfigError: no ``boards`` and no ``./leaderboards`` here, or ``boards`` inside the installed package.
    """
    if boards is None:
        if not LOCAL_BOARDS.is_dir():
            raise ConfigError(
                f"no ./leaderboards folder in {Path.cwd()}: give --boards DIR, a folder of your own (created on the "
                "first submission and seeded with the shipped board of the protocol)"
            )
        boards = LOCAL_BOARDS
    if is_inside_package(boards):
        raise ConfigError(
            f"--boards {boards}: that is the installed fer_bench package's own copy; give a folder of your own"
        )
    return Path(boards)


def seed_board(protocol: str, directory: str | os.PathLike) -> Path:
    """``<directory>/<protocol>.csv``, first copied from the shipped board (with its reported rows) when the folder
    has none; the shipped README.md comes along when the folder has none. Returns the board's path."""
    path = leaderboard_path(protocol, directory)
    shipped = leaderboard_path(protocol, shipped_boards())
    if path.exists() or not shipped.is_file() or path.resolve() == shipped.resolve():
        return path
    atomic_write_text(path, shipped.read_text())
    readme = Path(directory) / "README.md"
    if not readme.exists() and (shipped.parent / "README.md").is_file():
        atomic_write_text(readme, (shipped.parent / "README.md").read_text())
    return path


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


def regenerate_views(directory: str | os.PathLike) -> None:
    """Rewrite ``<protocol>.md`` for every CSV and the index table in ``README.md`` between its markers."""
    directory = Path(directory)
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
    if is_inside_package(path):
        raise ConfigError(f"{path}: inside the installed fer_bench package; write boards to a folder of your own")
    rows = read_leaderboard(path)
    if any(r["submission_sha256"] == entry["submission_sha256"] for r in rows if r["submission_sha256"]):
        raise DataError(f"{path}: this submission (sha256 {entry['submission_sha256'][:12]}…) is already on the board")
    rows = ranked([*rows, entry])
    atomic_write_text(path, _csv_text(rows))
    regenerate_views(path.parent)
    return rows
