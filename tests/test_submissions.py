"""Submissions are untrusted: malformed files get one clear error per problem kind, never a traceback, never a
wrong acceptance; leaderboards are written atomically and refuse the same submission twice; predict → submit →
show round-trips through the CLI."""

from __future__ import annotations

import csv
import io
import json
import os
from pathlib import Path

import numpy as np
import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from fer_bench.cli import app
from fer_bench.eval import list_protocols
from fer_bench.eval.leaderboard import COLUMNS, add_entry, read_leaderboard
from fer_bench.eval.submission import SubmissionError, read_submission
from tests.conftest import tiny_recipe_dict

NAMES = ("neutral", "happiness", "sadness")
IDS = [f"img_{i:03d}" for i in range(12)]
runner = CliRunner()


def _valid_rows(seed: int = 0) -> list[list[str]]:
    rng = np.random.default_rng(seed)
    probs = rng.dirichlet(np.ones(3), size=len(IDS))
    return [[i, *[f"{v:.6f}" for v in p]] for i, p in zip(IDS, probs, strict=True)]


def _write(path, header, rows) -> None:
    buffer = io.StringIO()
    csv.writer(buffer, lineterminator="\n").writerows([header, *rows])
    path.write_text(buffer.getvalue())


HEADER = ["image_id", "p_neutral", "p_happiness", "p_sadness"]
MUTATIONS = st.sampled_from(
    [
        "drop_row",
        "duplicate_row",
        "unknown_id",
        "negative",
        "nan",
        "text",
        "sum",
        "short_row",
        "bad_header",
        "extra_column",
        "shuffle",
        "path_id",
        "prediction_bad_class",
        "prediction_ok",
    ]
)


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    fmt=st.sampled_from(["probabilities", "prediction"]),
    mutations=st.lists(MUTATIONS, min_size=0, max_size=3),
    row=st.integers(0, len(IDS) - 1),
)
def test_malformed_submissions_never_pass_or_crash(tmp_path, fmt, mutations, row):
    header, rows = list(HEADER), _valid_rows()
    if fmt == "prediction":  # the other accepted format: one class name per row
        header, rows = ["image_id", "prediction"], [[x[0], NAMES[row % 3]] for x in rows]
    original_header, original_rows = list(header), {tuple(x) for x in rows}
    for mutation in mutations:
        r = row % len(rows) if rows else 0
        if mutation == "drop_row" and rows:
            rows.pop(r)
        elif mutation == "duplicate_row" and rows:
            rows.append(list(rows[r]))
        elif mutation == "unknown_id":
            rows.append(["not_an_id", *rows[0][1:]] if rows else ["not_an_id", "1", "0", "0"])
        elif mutation in ("negative", "nan", "text", "sum") and rows and len(rows[r]) > 1:
            rows[r][1] = {"negative": "-0.5", "nan": "nan", "text": "high", "sum": "1.5"}[mutation]
        elif mutation == "short_row" and rows:
            rows[r] = rows[r][:1]
        elif mutation == "bad_header":
            header = ["id", *header[1:]]
        elif mutation == "extra_column":
            header = [*header, "p_contempt"]
            rows = [[*x, "0"] for x in rows]
        elif mutation == "shuffle":
            rows = rows[::-1]  # order does not matter
        elif mutation == "path_id" and rows:
            rows[r][0] = "../../etc/passwd"
    # Valid exactly when the file still is the original in some order: mutations can undo each other
    # (duplicate a row, then drop the original), so validity is judged on the result, not on the steps.
    valid = (
        header == original_header
        and all(tuple(x) in original_rows for x in rows)
        and sorted(x[0] for x in rows) == sorted(IDS)
    )
    path = tmp_path / "sub.csv"
    _write(path, header, rows)
    try:
        result = read_submission(path, expected_ids=IDS, label_names=NAMES)
    except SubmissionError as exc:
        message = str(exc)
        assert message.startswith(str(path)) and "\n" not in message
        assert not valid, f"a valid file was refused: {message}"
        return
    assert valid, f"accepted a malformed file after {mutations}"
    assert (result["y_pred"] >= 0).all() and len(result["y_pred"]) == len(IDS)


def test_each_problem_kind_is_named(tmp_path):
    rows = _valid_rows()
    rows[1][0] = rows[0][0]  # duplicate (and img_001 missing)
    rows[2][2] = "-1"
    rows.append(["stranger", "1", "0", "0"])
    path = tmp_path / "sub.csv"
    _write(path, HEADER, rows)
    with pytest.raises(SubmissionError) as exc:
        read_submission(path, expected_ids=IDS, label_names=NAMES)
    message = str(exc.value)
    for kind in (
        "duplicate ids: 1 ('img_000')",
        "negative, NaN or infinite probabilities: 1 ('line 4')",
        "unknown ids (not in this protocol): 1 ('stranger')",
        "missing ids: 1 ('img_001')",
    ):
        assert kind in message
    path.write_bytes(b"\x00\x01binary")
    with pytest.raises(SubmissionError, match="NUL bytes"):
        read_submission(path, expected_ids=IDS, label_names=NAMES)
    with pytest.raises(SubmissionError, match="over the 5-byte limit"):
        read_submission(path, expected_ids=IDS, label_names=NAMES, max_bytes=5)


def _entry(sha: str, acc: str) -> dict[str, str]:
    return {c: "" for c in COLUMNS} | {"model": f"m{sha}", "acc": acc, "submission_sha256": sha, "source": "verified"}


def test_leaderboard_is_atomic_and_refuses_duplicates(tmp_path, monkeypatch):
    board = tmp_path / "rafdb.csv"
    add_entry(board, _entry("aaa", "0.8"))
    add_entry(board, _entry("bbb", "0.9"))
    assert [r["model"] for r in read_leaderboard(board)] == ["mbbb", "maaa"]
    assert [r["rank"] for r in read_leaderboard(board)] == ["1", "2"]
    with pytest.raises(Exception, match="already on the board"):
        add_entry(board, _entry("aaa", "0.99"))
    before = board.read_bytes()

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", crash)  # the crash happens between writing the temp file and the rename
    with pytest.raises(OSError):
        add_entry(board, _entry("ccc", "0.95"))
    monkeypatch.undo()
    assert board.read_bytes() == before
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
    assert "| 1 | mbbb |" in (tmp_path / "rafdb.md").read_text()


def test_predict_submit_show_round_trip(tiny_synthfer, tmp_path):
    recipe = tmp_path / "tiny.yaml"
    recipe.write_text(yaml.safe_dump(tiny_recipe_dict(tiny_synthfer, tmp_path, **{"optim.epochs": 1})))
    assert runner.invoke(app, ["train", str(recipe)]).exit_code == 0
    sub = tmp_path / "sub.csv"
    common = ["--dataset", "synthfer", "--root", str(tiny_synthfer)]
    result = runner.invoke(
        app, ["predict", "--checkpoint", str(tmp_path / "run" / "best.pt"), *common, "--out", str(sub)]
    )
    assert result.exit_code == 0, result.output
    assert sub.read_text().splitlines()[0] == "image_id," + ",".join(
        f"p_{n}" for n in ("neutral", "happiness", "sadness", "surprise", "fear", "disgust", "anger", "contempt")
    )
    meta = tmp_path / "meta.yaml"
    meta.write_text("model: tiny-vit\nbackbone: vit_tiny_patch16_224\nparams_m: 0.1\npretrain: none\n")
    boards = tmp_path / "boards"
    args = [
        "leaderboard",
        "submit",
        str(sub),
        *common,
        "--meta",
        str(meta),
        "--leaderboards",
        str(boards),
        "--bootstrap",
        "200",
    ]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    rows = read_leaderboard(boards / "synthfer.csv")
    assert rows[0]["model"] == "tiny-vit" and rows[0]["source"] == "verified" and len(rows[0]["dataset_hash"]) == 64
    assert float(rows[0]["acc_ci_low"]) <= float(rows[0]["acc"]) <= float(rows[0]["acc_ci_high"])
    again = runner.invoke(app, args)
    assert again.exit_code == 2 and "already on the board" in again.output
    shown = runner.invoke(
        app, ["leaderboard", "show", "synthfer", "--leaderboards", str(boards)], env={"COLUMNS": "200"}
    )
    assert shown.exit_code == 0 and "tiny-vit" in shown.output
    # the same file scored by eval --predictions gives the same numbers
    result = runner.invoke(
        app, ["eval", *common, "--predictions", str(sub), "--json", "--no-tracking", "--bootstrap", "200"]
    )
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["metrics"]["acc"] == pytest.approx(float(rows[0]["acc"]), abs=1e-6)
    worse = tmp_path / "worse.csv"
    lines = sub.read_text().splitlines()
    worse.write_text("\n".join([lines[0], *[line.rsplit(",", 8)[0] + ",1,0,0,0,0,0,0,0" for line in lines[1:]]]) + "\n")
    paired = runner.invoke(
        app, ["compare", "--a", str(sub), "--b", str(worse), *common, "--bootstrap", "200"], env={"COLUMNS": "200"}
    )
    assert paired.exit_code == 0, paired.output
    assert "p (A beats B)" in paired.output and "acc" in paired.output
    template = tmp_path / "template.csv"
    assert runner.invoke(app, ["leaderboard", "template", *common, "--out", str(template)]).exit_code == 0
    assert len(template.read_text().splitlines()) == 49  # header + the 48 test ids
    bad = tmp_path / "bad.csv"
    bad.write_text(sub.read_text().replace("test_", "tset_", 1))
    result = runner.invoke(
        app, ["leaderboard", "submit", str(bad), *common, "--meta", str(meta), "--leaderboards", str(boards)]
    )
    assert result.exit_code == 2 and "unknown ids" in result.output and "missing ids" in result.output
    assert "Traceback" not in result.output


@pytest.mark.parametrize("name", list_protocols())
def test_shipped_leaderboards_are_valid(name):
    from fer_bench.eval.leaderboard import shipped_boards

    shipped = shipped_boards()
    path = shipped / f"{name}.csv"
    assert path.is_file() and (shipped / f"{name}.md").is_file(), f"protocol {name!r} ships no leaderboard"
    rows = read_leaderboard(path)  # raises on a foreign header
    for row in rows:
        assert row["source"] in ("reported", "verified") and 0 < float(row["acc"]) < 1
        assert row["source"] != "reported" or row["reference"]  # a reported figure cites where it comes from
    if name == "rafdb":
        assert len(rows) >= 5


def test_a_submission_is_the_same_whatever_its_bytes(tmp_path):
    """CRLF line endings, reordered rows and columns, blank lines: the same predictions, the same content hash (the
    board's duplicate check); line numbers in errors are the file's own, blank lines counted."""
    rows = _valid_rows(3)
    plain = tmp_path / "plain.csv"
    _write(plain, HEADER, rows)
    other = tmp_path / "other.csv"
    order = [0, 3, 1, 2]
    body = [",".join(HEADER[i] for i in order)] + [",".join(r[i] for i in order) for r in reversed(rows)]
    other.write_bytes(("\r\n".join(body[:3]) + "\r\n\r\n" + "\r\n".join(body[3:]) + "\r\n").encode())
    a, b = (read_submission(p, expected_ids=IDS, label_names=NAMES) for p in (plain, other))
    assert a["content_sha256"] == b["content_sha256"]
    changed = [r[:] for r in rows]
    changed[0][1:] = ["0.500000", "0.250000", "0.250000"]
    _write(tmp_path / "changed.csv", HEADER, changed)
    assert (
        read_submission(tmp_path / "changed.csv", expected_ids=IDS, label_names=NAMES)["content_sha256"]
        != (a["content_sha256"])
    )
    broken = tmp_path / "broken.csv"
    broken.write_text("\n".join([",".join(HEADER), "", "", ",".join(rows[0]), "img_001,x,0.5,0.5"]) + "\n")
    with pytest.raises(SubmissionError, match="line 5"):  # the 5th line of the file, blank lines counted
        read_submission(broken, expected_ids=IDS, label_names=NAMES)


def test_metadata_cannot_inject_formulas_or_table_rows(tmp_path):
    from fer_bench.eval.leaderboard import safe_text

    assert safe_text("=cmd|' /C calc'!A0") == "'=cmd|' /C calc'!A0"
    assert safe_text("@SUM(A1)") == "'@SUM(A1)" and safe_text("+1") == "'+1" and safe_text("vit") == "vit"
    assert safe_text("two\nlines") == "two lines"
    board = tmp_path / "rafdb.csv"
    entry = _entry("aaa", "0.8")
    entry["model"] = safe_text("evil | 1 | x |\n| 0 | injected")
    add_entry(board, entry)
    table = (tmp_path / "rafdb.md").read_text().splitlines()
    rows = [line for line in table if line.startswith("| ") and not line.startswith("| rank")]
    assert len(rows) == 1 and "evil \\| 1 \\| x \\| \\| 0 \\| injected" in rows[0]


def test_boards_default_to_the_local_folder_and_are_seeded_from_the_shipped_ones(tmp_path, monkeypatch):
    from fer_bench.errors import ConfigError
    from fer_bench.eval.leaderboard import boards_to_read, boards_to_write, seed_board, shipped_boards

    monkeypatch.chdir(tmp_path)  # no ./leaderboards here
    assert boards_to_read() == shipped_boards() and boards_to_read(tmp_path / "mine") == tmp_path / "mine"
    with pytest.raises(ConfigError, match=r"no \./leaderboards folder in .*: give --boards DIR"):
        boards_to_write()
    shown = runner.invoke(app, ["leaderboard", "show", "rafdb"], env={"COLUMNS": "200"})
    assert shown.exit_code == 0 and "FMAE" in shown.output  # the shipped board's reported rows
    mine = tmp_path / "mine"
    board = seed_board("rafdb", boards_to_write(mine))
    assert board == mine / "rafdb.csv" and board.read_text() == (shipped_boards() / "rafdb.csv").read_text()
    assert (mine / "README.md").is_file()
    add_entry(board, _entry("aaa", "0.999"))
    rows = read_leaderboard(board)
    assert rows[0]["model"] == "maaa" and len(rows) == len(read_leaderboard(shipped_boards() / "rafdb.csv")) + 1
    assert seed_board("rafdb", mine) == board and len(read_leaderboard(board)) == len(rows)  # seeded only once
    (tmp_path / "leaderboards").mkdir()
    assert boards_to_write() == boards_to_read() == Path("leaderboards")
    result = runner.invoke(app, ["leaderboard", "show", "rafdb"])
    assert result.exit_code == 2 and "leaderboards/rafdb.csv: no such leaderboard" in result.output
