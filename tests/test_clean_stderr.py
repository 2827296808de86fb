"""A normal run says only fer_bench's own messages: no Python, OpenCV, torch or MLflow warnings on stderr.

The CLI runs in a subprocess, so this sees the real stderr: pytest's own warning capture (and the
``ignore::DeprecationWarning`` filter in pyproject) would hide what a user sees.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

from tests.test_face_predict import grace_hopper

REPO = Path(__file__).resolve().parents[1]

# A warning however it is printed: Python's warnings module ("file.py:12: UserWarning: ..."), a logged warning
# ("WARNING ..." from logging's default format, or glog's "W1130 16:04:27.926 ..." from torch's C++ side),
# OpenCV ("[ WARN:0@1.2] ..."), urllib3's retry lines, and a traceback.
WARNING_LINE = re.compile(
    r"Warning\b|\bWARNING\b|^\s*W\d{4} \d\d:\d\d|\[ ?WARN|urllib3|Retrying \(|Traceback", re.MULTILINE
)


def _ferbench(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONWARNINGS", "MLFLOW_ENABLE_ASYNC_LOGGING")}
    env["PYTHONPATH"] = str(REPO)  # this checkout's fer_bench, also in the subprocess
    env["COLUMNS"] = "120"
    result = subprocess.run(
        [sys.executable, "-m", "fer_bench", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, f"ferbench {' '.join(args)}:\n{result.stdout}\n{result.stderr}"
    return result


def _warning_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if WARNING_LINE.search(line)]


def test_warning_pattern_catches_the_usual_forms():
    seen = [
        "/x/site-packages/timm/layers/foo.py:12: UserWarning: Overwriting vit in registry",
        "/x/torch/jit/_trace.py:1: TracerWarning: Converting a tensor to a Python boolean",
        "FutureWarning: The filesystem tracking backend is deprecated",
        "[ WARN:0@0.012] global cap_ffmpeg_impl.hpp:453 _opencv_ffmpeg_interrupt_callback",
        "W1130 16:04:27.926000 29385 torch/utils/cpp_extension.py:183] No CUDA runtime is found",
        "2025/01/01 10:00:00 WARNING mlflow.utils.requirements_utils: Found torch version",
        "urllib3.connectionpool: Retrying (Retry(total=0))",
    ]
    assert [line for line in seen if not _warning_lines(line)] == []
    ours = [
        "epoch 1/1 ━━━━━━━━━━━━━━━━ 3/3 0:00:00 0:00:00 loss 2.160  val_acc 0.0938  (1 s)",
        "data: device loader, cache /tmp/c/synthfer-32px-cd0f574cfb (device); 1 process(es), global batch 32",
        "eval synthfer ━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━ 48/? 0:00:00",
    ]
    assert _warning_lines("\n".join(ours)) == []


def test_quickstart_train_eval_and_predict_print_no_warnings(tiny_synthfer, mtcnn_wheel, tmp_path):
    """The quickstart recipe cut to one epoch at 32 px (conv stem, bf16 where the CPU has it, channels_last, the
    prepared cache and the device loader, an sqlite MLflow store), then eval and predict on its checkpoint."""
    run = tmp_path / "run"
    overrides = {
        "data.root": tiny_synthfer,
        "data.img_size": 32,
        "model.backbone_kwargs.depth": 1,
        "optim.epochs": 1,
        "optim.warmup_epochs": 0,
        "optim.batch_size": 32,
        "tracking.tracking_uri": f"sqlite:///{tmp_path / 'mlflow.db'}",
        "output_dir": run,
    }
    sets = [arg for key, value in overrides.items() for arg in ("--set", f"{key}={value}")]
    steps = {
        "train": _ferbench("train", str(REPO / "recipes" / "quickstart.yaml"), *sets, cwd=tmp_path),
        "eval": _ferbench(
            "eval",
            *("--dataset", "synthfer", "--root", str(tiny_synthfer), "--checkpoint", str(run / "best.pt")),
            *("--bootstrap", "20", "--tta", "flip", "--out", str(tmp_path / "eval")),
            cwd=tmp_path,
        ),
        "predict dataset": _ferbench(
            "predict",
            *("--checkpoint", str(run / "best.pt"), "--dataset", "synthfer", "--root", str(tiny_synthfer)),
            *("--out", str(tmp_path / "submission.csv")),
            cwd=tmp_path,
        ),
        "predict photo": _ferbench(
            "predict",
            *("--checkpoint", str(run / "best.pt"), "--images", str(grace_hopper())),
            *("--detector-weights", str(mtcnn_wheel), "--out", str(tmp_path / "faces.csv")),
            *("--overlay", str(tmp_path / "overlay")),
            cwd=tmp_path,
        ),
    }
    assert (tmp_path / "eval" / "results.json").is_file() and (tmp_path / "faces.csv").is_file()
    leaks = {step: _warning_lines(result.stderr) for step, result in steps.items()}
    assert {step: lines for step, lines in leaks.items() if lines} == {}
    assert "epoch 1" in steps["train"].stderr + steps["train"].stdout  # stderr was captured, not lost
