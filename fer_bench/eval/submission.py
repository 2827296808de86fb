"""Submission files: a CSV of ``image_id`` plus ``prediction`` or one ``p_<class>`` column per class.

The file is untrusted input: it is read as text with a size limit, every problem is collected by kind (missing,
duplicate and unknown ids, bad class names, bad probabilities) and reported in one message, and ids are only
compared with the protocol's ids, never used as paths. A valid submission is scored exactly like a model's
predictions (:func:`score_submission`); two are compared with a paired bootstrap (:func:`compare_submissions`).
"""

from __future__ import annotations

import csv
import hashlib
import io
import math
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from fer_bench._io import atomic_write_text, sha256_file
from fer_bench.data import DatasetInfo, FaceDataset, create_transform
from fer_bench.errors import DataError
from fer_bench.eval import bootstrap as B
from fer_bench.eval.inference import predict, renormalize
from fer_bench.eval.protocols import Protocol, protocol_rows
from fer_bench.eval.results import HEADLINE, align_rows, label_alignment, score
from fer_bench.models import FerModel

MAX_SUBMISSION_BYTES = 64 * 2**20
SUM_TOLERANCE = 1e-3
SHOWN = 20
META_FIELDS = {
    "model": str,
    "backbone": str,
    "params_m": (int, float),
    "pretrain": str,
    "extra_data": str,
    "paper": str,
    "code": str,
}


class SubmissionError(DataError):
    """A submission or its metadata is malformed (the message lists every problem kind)."""


def probability_columns(label_names: tuple[str, ...] | list[str]) -> list[str]:
    return [f"p_{name}" for name in label_names]


def _listed(items: list[str]) -> str:
    shown = ", ".join(repr(i) for i in items[:SHOWN])
    return f"{len(items)} ({'first 20: ' if len(items) > SHOWN else ''}{shown})"


def read_submission(
    path: str | os.PathLike,
    *,
    expected_ids: list[str],
    label_names: tuple[str, ...],
    max_bytes: int = MAX_SUBMISSION_BYTES,
) -> dict[str, Any]:
    """Validate ``path`` against the protocol's ids and classes.

    Returns ``{"kind": "prediction" | "probabilities", "y_pred": [N] class indices, "probs": [N, K] | None}`` in the
    order of ``expected_ids``.

    Raises:
        SubmissionError: one message naming the file and every problem kind found (counts, first 20 examples).
    """
    path = Path(path)
    if not path.is_file():
        raise SubmissionError(f"{path}: submission file not found")
    size = path.stat().st_size
    if size > max_bytes:
        raise SubmissionError(f"{path}: {size:,} bytes is over the {max_bytes:,}-byte limit for a submission")
    try:
        text = path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError:
        raise SubmissionError(f"{path}: not UTF-8 text") from None
    if "\x00" in text:
        raise SubmissionError(f"{path}: contains NUL bytes; expected a CSV text file")
    try:
        reader = csv.reader(io.StringIO(text))
        numbered = [(reader.line_num, record) for record in reader]  # the file's own line numbers, blanks counted
    except csv.Error as exc:
        raise SubmissionError(f"{path}: not a readable CSV ({exc})") from None
    numbered = [(line, r) for line, r in numbered if any(field.strip() for field in r)]
    records = [r for _, r in numbered]
    if not records:
        raise SubmissionError(f"{path}: empty file; expected a header 'image_id,prediction' or 'image_id,p_<class>...'")
    header = [h.strip() for h in records[0]]
    p_columns = probability_columns(label_names)
    if not header or header[0] != "image_id":
        raise SubmissionError(f"{path}: the first column must be 'image_id', found {header[:3]}")
    if header[1:] == ["prediction"]:
        kind = "prediction"
    elif sorted(header[1:]) == sorted(p_columns):
        kind = "probabilities"
    else:
        raise SubmissionError(
            f"{path}: header must be 'image_id,prediction' or 'image_id,' + {','.join(p_columns)}; found {header}"
        )
    expected_index = {image_id: i for i, image_id in enumerate(expected_ids)}
    problems: dict[str, list[str]] = {}

    def problem(kind_: str, item: str) -> None:
        problems.setdefault(kind_, []).append(item)

    seen: dict[str, int] = {}
    y_pred = np.full(len(expected_ids), -1, dtype=np.int64)
    probs = np.zeros((len(expected_ids), len(label_names))) if kind == "probabilities" else None
    order = [header.index(c) for c in p_columns] if kind == "probabilities" else []
    for line, record in numbered[1:]:
        if len(record) != len(header):
            problem("rows with the wrong number of fields", f"line {line}")
            continue
        image_id = record[0].strip()
        if image_id in seen:
            problem("duplicate ids", image_id)
            continue
        seen[image_id] = line
        if image_id not in expected_index:
            problem("unknown ids (not in this protocol)", image_id)
            continue
        row = expected_index[image_id]
        if kind == "prediction":
            name = record[1].strip()
            if name not in label_names:
                problem(f"class names not in {list(label_names)}", f"line {line}: {name!r}")
                continue
            y_pred[row] = label_names.index(name)
        else:
            try:
                values = np.array([float(record[i]) for i in order])
            except ValueError:
                problem("non-numeric probabilities", f"line {line}")
                continue
            if not np.isfinite(values).all() or (values < 0).any():
                problem("negative, NaN or infinite probabilities", f"line {line}")
                continue
            if not math.isclose(values.sum(), 1.0, abs_tol=SUM_TOLERANCE):
                problem(f"probabilities not summing to 1 ± {SUM_TOLERANCE}", f"line {line}: {values.sum():.4f}")
                continue
            probs[row] = values
            y_pred[row] = int(values.argmax())
    missing = [i for i in expected_ids if i not in seen]
    if missing:
        problems["missing ids"] = missing
    if problems:
        details = "; ".join(f"{k}: {_listed(v)}" for k, v in problems.items())
        raise SubmissionError(f"{path}: {details}")
    return {"kind": kind, "y_pred": y_pred, "probs": probs, "content_sha256": content_hash(kind, y_pred, probs)}


def content_hash(kind: str, y_pred: np.ndarray, probs: np.ndarray | None) -> str:
    """SHA-256 of what a submission predicts, in the protocol's order: the same predictions give the same hash
    whatever the file's line endings, column order, row order or number formatting (probabilities to 1e-6)."""
    digest = hashlib.sha256(kind.encode())
    if probs is not None:
        digest.update(np.round(np.asarray(probs, np.float64), 6).tobytes())
    else:
        digest.update(np.asarray(y_pred, np.int64).tobytes())
    return digest.hexdigest()


def write_submission(
    path: str | os.PathLike, *, ids: list[str], label_names: tuple[str, ...], probs: np.ndarray | None = None
) -> Path:
    """Write ``image_id`` + ``p_<class>`` columns (or only the header and ids, a template) atomically."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["image_id", *probability_columns(label_names)])
    for i, image_id in enumerate(ids):
        values = [f"{v:.6f}" for v in probs[i]] if probs is not None else [""] * len(label_names)
        writer.writerow([image_id, *values])
    atomic_write_text(path, buffer.getvalue())
    return Path(path)


def read_meta(path: str | os.PathLike | None) -> dict[str, Any]:
    """The sidecar YAML (``yaml.safe_load``): ``model`` is required; known fields are type-checked."""
    if path is None:
        raise SubmissionError("--meta: a sidecar YAML with at least 'model: NAME' is required")
    path = Path(path)
    if not path.is_file():
        raise SubmissionError(f"{path}: metadata file not found")
    try:
        meta = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise SubmissionError(f"{path}: invalid YAML ({exc})") from None
    if not isinstance(meta, dict):
        raise SubmissionError(f"{path}: expected a mapping of fields, got {type(meta).__name__}")
    unknown = sorted(set(meta) - set(META_FIELDS))
    if unknown:
        raise SubmissionError(f"{path}: unknown fields {unknown}; expected {sorted(META_FIELDS)}")
    for key, kind in META_FIELDS.items():
        if key in meta and meta[key] is not None and not isinstance(meta[key], kind):
            raise SubmissionError(f"{path}: field {key!r} must be {getattr(kind, '__name__', 'a number')}")
    if not meta.get("model"):
        raise SubmissionError(f"{path}: field 'model' is required")
    return meta


# ---------------------------------------------------------------------------------------------------------------------
# Scoring: a submission against the protocol's rows, two submissions against each other, a model's probabilities


def score_submission(
    path: str | os.PathLike,
    info: DatasetInfo,
    protocol: Protocol,
    *,
    n_bootstrap: int = 1000,
    seed: int = 0,
    min_group_size: int = 30,
) -> dict[str, Any]:
    """Validate a submission CSV against the protocol's rows and score it like a model's predictions."""
    rows = protocol_rows(protocol, info)
    scored = list(info.label_space.names)
    submission = read_submission(path, expected_ids=rows["image_id"].astype(str).tolist(), label_names=tuple(scored))
    probs = submission["probs"]
    results = score(
        info=info,
        rows=rows,
        scored=scored,
        probs=probs,
        y_pred=None if probs is not None else submission["y_pred"],
        protocol=protocol,
        split=protocol.split,
        config={"submission": submission["kind"], "min_group_size": min_group_size},
        n_bootstrap=n_bootstrap,
        seed=seed,
        min_group_size=min_group_size,
    )
    results["predictions"] = str(path)
    results["submission_sha256"] = sha256_file(Path(path))
    results["predictions_sha256"] = submission["content_sha256"]  # the board's duplicate check: content, not bytes
    return results


def protocol_probabilities(
    model: FerModel,
    info: DatasetInfo,
    protocol: Protocol,
    *,
    img_size: int,
    label_names: tuple[str, ...],
    batch_size: int = 128,
    device: str | torch.device = "cpu",
    tta: str | None = None,
    progress=None,
) -> tuple[list[str], np.ndarray]:
    """(ids, probabilities [N, K_dataset]) of ``model`` on every row of the protocol, ready for a submission.

    Classes the model does not predict get probability 0; classes the dataset lacks are masked, the rest renormalised.
    """
    rows = protocol_rows(protocol, info)
    dataset_names = list(info.label_space.names)
    if not info.label_space.canonical and tuple(label_names) != tuple(dataset_names):
        align_rows(rows, info, label_names)  # raises the taxonomy error
    shared = [n for n in dataset_names if n in label_names]
    if not shared:
        label_alignment(tuple(label_names), tuple(dataset_names))  # raises "no class in common"
    dataset = FaceDataset.from_info(
        info, protocol.split, transform=create_transform(train=False, img_size=img_size), rows=rows
    )
    probs = predict(model, dataset, batch_size=batch_size, device=device, tta=tta, progress=progress)
    full = np.zeros((len(rows), len(dataset_names)))
    for name in shared:
        full[:, dataset_names.index(name)] = probs[:, list(label_names).index(name)]
    return rows["image_id"].astype(str).tolist(), renormalize(full)


def compare_submissions(
    path_a: str | os.PathLike,
    path_b: str | os.PathLike,
    info: DatasetInfo,
    protocol: Protocol,
    *,
    n_bootstrap: int = 1000,
    seed: int = 0,
) -> dict[str, dict[str, float]]:
    """Paired bootstrap test of two submissions on the same protocol rows: for accuracy, mean class accuracy and
    macro-F1, the difference A − B, its CI and the p-value of "A beats B"."""
    rows = protocol_rows(protocol, info)
    names = tuple(info.label_space.names)
    ids = rows["image_id"].astype(str).tolist()
    a = read_submission(path_a, expected_ids=ids, label_names=names)["y_pred"]
    b = read_submission(path_b, expected_ids=ids, label_names=names)["y_pred"]
    y_true = rows["label"].to_numpy(np.int64)
    return {
        key: B.paired_bootstrap_test(
            y_true, a, b, num_classes=len(names), statistic=fn, n_resamples=n_bootstrap, seed=seed
        )
        for key, fn in HEADLINE.items()
    }
