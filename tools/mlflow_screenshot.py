"""Screenshots of MLflow's own UI for the README: the runs table with its Dataset column (docs/mlflow_runs.png) and
two runs compared side by side (docs/mlflow_compare.png).

It starts a real ``mlflow server`` on a free localhost port against a store (by default a fresh
``sqlite:///<workdir>/mlflow.db``), optionally trains two quickstart runs into it, opens the experiment's runs page
and the comparison of its two newest training runs in a headless Chromium, saves the two PNGs and stops the server.

Prerequisites (none of them is a project dependency):

    apt-get install -y chromium                          # Debian's Chromium, /usr/bin/chromium
    python3 -m venv /tmp/pwvenv
    /tmp/pwvenv/bin/pip install playwright pillow        # never `playwright install`: the system Chromium is used

Commands (from the repository root; the server and the trainings run with the project's .venv):

    # what made the README's pictures: a fresh store, two full quickstart runs (seeds 0 and 1)
    FER_BENCH_CACHE_DIR=/tmp/mlflow_full/cache /tmp/pwvenv/bin/python tools/mlflow_screenshot.py --train \\
        --workdir /tmp/mlflow_full --set data.root=$PWD/data/synthfer
    # shorter runs: add overrides, e.g. --set optim.epochs=3
    # or an existing store and experiment, as they are
    /tmp/pwvenv/bin/python tools/mlflow_screenshot.py --tracking-uri sqlite:///mlflow.db --experiment quickstart

The pages are opened with ``?workflowType=machine_learning``: MLflow 3.17's UI otherwise opens an experiment on its
GenAI overview (see ``fer_bench.train.tracking.runs_page_url``).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
MAX_BYTES = 400_000


def free_port() -> int:
    """A localhost port nothing listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(url: str, payload: dict | None = None, timeout: float = 10.0) -> dict:
    data = json.dumps(payload).encode() if payload is not None else None
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return json.loads(response.read() or b"{}")


@contextlib.contextmanager
def mlflow_server(*, python: str, tracking_uri: str, workdir: Path, port: int) -> Iterator[str]:
    """A running ``mlflow server`` on 127.0.0.1:``port`` for the block; stopped (its process group) afterwards."""
    log = open(workdir / "mlflow_server.log", "w")  # noqa: SIM115  (closed below)
    command = [
        python,
        "-m",
        "mlflow",
        "server",
        "--backend-store-uri",
        tracking_uri,
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--workers",
        "1",
    ]
    process = subprocess.Popen(command, cwd=workdir, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while True:
            if process.poll() is not None:
                raise SystemExit(f"mlflow server exited with {process.returncode}; see {workdir / 'mlflow_server.log'}")
            with contextlib.suppress(OSError), urllib.request.urlopen(f"{base}/health", timeout=2) as response:
                if response.status == 200:
                    break
            if time.monotonic() > deadline:
                raise SystemExit(f"mlflow server did not answer at {base} within 180 s")
            time.sleep(1)
        yield base
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, 15)
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, 9)
            process.wait()
        log.close()


def train_runs(*, python: str, tracking_uri: str, workdir: Path, seeds: list[int], overrides: list[str]) -> None:
    """``ferbench train recipes/quickstart.yaml`` once per seed, into ``tracking_uri``; run folders, the generated
    SynthFER and its prepared cache in ``workdir`` (unless ``FER_BENCH_CACHE_DIR`` says where caches go)."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.setdefault("FER_BENCH_CACHE_DIR", str(workdir / "cache"))
    for seed in seeds:
        command = [python, "-m", "fer_bench", "train", str(REPO / "recipes" / "quickstart.yaml")]
        for item in [
            f"runtime.seed={seed}",
            f"tracking.tracking_uri={tracking_uri}",
            f"tracking.run_name=quickstart-seed{seed}",
            *overrides,
        ]:
            command += ["--set", item]
        print("+", " ".join(command), flush=True)
        subprocess.run(command, cwd=workdir, env=env, check=True)


def experiment_and_runs(base: str, experiment: str) -> tuple[str, list[tuple[str, str]]]:
    """The experiment's id and its training runs' (id, name), newest first, through the server's REST API."""
    name = urllib.parse.quote(experiment)
    found = _get(f"{base}/api/2.0/mlflow/experiments/get-by-name?experiment_name={name}")["experiment"]
    runs = _get(
        f"{base}/api/2.0/mlflow/runs/search",
        {
            "experiment_ids": [found["experiment_id"]],
            "filter": "tags.kind = 'train'",
            "order_by": ["attributes.start_time DESC"],
            "max_results": 10,
        },
    ).get("runs", [])
    return found["experiment_id"], [(r["info"]["run_id"], r["info"]["run_name"]) for r in runs]


def shrink(path: Path, *, max_bytes: int = MAX_BYTES) -> None:
    """Re-save ``path`` as an optimised, palette PNG, scaling it down in steps until it is under ``max_bytes``."""
    from PIL import Image

    image = Image.open(path).convert("RGB")
    while True:
        image.quantize(colors=128, method=Image.Quantize.MEDIANCUT).save(path, optimize=True)
        if path.stat().st_size <= max_bytes or image.width < 600:
            return
        image = image.resize((int(image.width * 0.85), int(image.height * 0.85)), Image.LANCZOS)


def _settle(page, wait_s: float) -> None:
    """Let a page load its data and render; close MLflow's assistant panel, which takes a third of the width."""
    with contextlib.suppress(Exception):
        page.wait_for_load_state("networkidle", timeout=int(wait_s * 3000))
    page.wait_for_timeout(int(wait_s * 1000))
    close = page.get_by_role("button", name="Close", exact=True)
    if close.count():
        close.first.click()
        page.wait_for_timeout(800)


def screenshots(
    *, base: str, experiment_id: str, runs: list[tuple[str, str]], out_dir: Path, wait_s: float
) -> list[Path]:
    """The runs page (training runs expanded to show their evaluation runs, every dataset input listed) and the
    comparison of the two newest training runs, as PNGs in ``out_dir``."""
    from playwright.sync_api import sync_playwright

    ml = {"workflowType": "machine_learning"}  # the "Machine learning" view (MLflow 3.17 opens GenAI otherwise)
    runs_url = f"{base}/#/experiments/{experiment_id}/runs?{urllib.parse.urlencode(ml)}"
    ids = [run_id for run_id, _ in runs[:2]]
    query = {"runs": json.dumps(ids), "experiments": json.dumps([experiment_id]), **ml}
    compare_url = f"{base}/#/compare-runs?{urllib.parse.urlencode(query)}"
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        context = browser.new_context(viewport={"width": 1500, "height": 620}, device_scale_factor=1)
        page = context.new_page()
        print("open", runs_url, flush=True)
        page.goto(runs_url, wait_until="domcontentloaded", timeout=120_000)
        _settle(page, wait_s)
        for _, name in runs[:2]:  # the expander in the run's name cell shows its child (evaluation) run
            page.locator(".ag-row", has_text=name).locator("button").first.click()
            page.wait_for_timeout(500)
        page.get_by_text("Expand rows", exact=True).click()  # every dataset input of a run, not the first and "+2"
        page.wait_for_timeout(1500)
        runs_png = out_dir / "mlflow_runs.png"
        page.screenshot(path=str(runs_png))
        page = context.new_page()
        print("open", compare_url, flush=True)
        page.goto(compare_url, wait_until="domcontentloaded", timeout=120_000)
        _settle(page, wait_s)
        for section in ("Visualizations", "Parameters"):  # folded: the run details and the metrics side by side
            with contextlib.suppress(Exception):
                page.get_by_text(section, exact=True).first.click(timeout=5000)
                page.wait_for_timeout(500)
        page.set_viewport_size({"width": 1500, "height": 900})
        page.wait_for_timeout(1000)
        compare_png = out_dir / "mlflow_compare.png"
        page.screenshot(path=str(compare_png))
        browser.close()
    for path in (runs_png, compare_png):
        shrink(path)
    return [runs_png, compare_png]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tracking-uri", help="MLflow store (default: a fresh sqlite:///<workdir>/mlflow.db)")
    parser.add_argument("--workdir", type=Path, help="folder for the store, run folders and the server log")
    parser.add_argument("--experiment", default="quickstart", help="experiment to show (default: quickstart)")
    parser.add_argument("--train", action="store_true", help="train two quickstart runs into the store first")
    parser.add_argument("--seeds", type=int, nargs=2, default=[0, 1], help="their seeds (default: 0 1)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], help="recipe override for both")
    parser.add_argument("--out-dir", type=Path, default=REPO / "docs", help="where the PNGs go (default: docs/)")
    parser.add_argument("--python", default=str(REPO / ".venv" / "bin" / "python"), help="the project's Python")
    parser.add_argument("--wait", type=float, default=6.0, help="seconds to let each page render")
    args = parser.parse_args(argv)

    workdir = (args.workdir or Path(tempfile.mkdtemp(prefix="mlflow_shots_"))).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    tracking_uri = args.tracking_uri or f"sqlite:///{workdir / 'mlflow.db'}"
    if args.train:
        train_runs(
            python=args.python, tracking_uri=tracking_uri, workdir=workdir, seeds=args.seeds, overrides=args.overrides
        )
    args.out_dir.mkdir(parents=True, exist_ok=True)
    with mlflow_server(python=args.python, tracking_uri=tracking_uri, workdir=workdir, port=free_port()) as base:
        experiment_id, runs = experiment_and_runs(base, args.experiment)
        if len(runs) < 2:
            print(f"experiment {args.experiment!r} in {tracking_uri} has {len(runs)} training run(s); need 2")
            return 2
        for path in screenshots(
            base=base, experiment_id=experiment_id, runs=runs, out_dir=args.out_dir, wait_s=args.wait
        ):
            print(f"wrote {path} ({path.stat().st_size // 1000} KB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
