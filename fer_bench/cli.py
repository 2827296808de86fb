"""The ``ferbench`` command line: parse, call one library function, print. Nothing imports this module.

Only :class:`fer_bench.errors.FerBenchError` becomes a one-line message with exit code 2; anything else is a bug
and keeps its traceback.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from fer_bench import __version__
from fer_bench.errors import FerBenchError

app = typer.Typer(
    name="ferbench",
    help="fer_bench: train, evaluate and compare facial-expression classifiers.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_show_locals=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)
data_app = typer.Typer(
    help="Datasets: list adapters, describe and verify a dataset, generate SynthFER, cache and align faces.",
    no_args_is_help=True,
)
app.add_typer(data_app, name="data")

console = Console(stderr=True)
stdout = Console(soft_wrap=True)  # paths and ids must stay on one line for grep and tests

DatasetName = Annotated[str, typer.Option("--dataset", help="Dataset name (ferbench data list shows them).")]
DatasetRoot = Annotated[Path, typer.Option("--root", help="Dataset folder, as its owners distribute it.")]
OptionList = Annotated[
    list[str] | None,
    typer.Option("--option", "-o", help="Adapter option key=value (repeatable), e.g. classes=7, mode=crossentropy."),
]


def _fail(message: str) -> None:
    console.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)
    raise typer.Exit(code=2)


def _user_errors(fn):
    """Turn FerBenchError into one line on stderr and exit code 2."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except FerBenchError as exc:
            _fail(str(exc))

    return wrapper


def _progress() -> Progress:
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        TextColumn("{task.fields[info]}"),
        console=console,
        transient=False,
    )


def _version(value: bool) -> None:
    if value:
        stdout.print(f"fer_bench {__version__}")
        raise typer.Exit()


@app.callback()
def main_callback(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version.")
    ] = False,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Log debug messages.")] = False,
) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s"
    )
    for noisy in ("mlflow", "alembic"):
        logging.getLogger(noisy).setLevel(logging.DEBUG if verbose else logging.WARNING)
    if not verbose:  # OpenCV's and FFmpeg's own lines ("moov atom not found") would come before our one-line error
        os.environ.setdefault("OPENCV_FFMPEG_LOGLEVEL", "-8")
        os.environ.setdefault("OPENCV_LOG_LEVEL", "ERROR")


# ---------------------------------------------------------------------------------------------------------------------
# train


class _CliCallbacks:
    def __init__(self, progress: Progress) -> None:
        self.progress = progress
        self.task = None
        self.running = 0.0

    def message(self, text: str) -> None:
        self.progress.console.print(text, highlight=False)

    def start_epoch(self, epoch: int, epochs: int, steps: int, done: int = 0) -> None:
        self.task = self.progress.add_task(f"epoch {epoch + 1}/{epochs}", total=steps, completed=done, info="")
        self.running = 0.0

    def step(self, loss: float | None) -> None:
        # the loss arrives every runtime.log_every steps: reading it waits for the device
        if loss is None:
            self.progress.update(self.task, advance=1)
            return
        self.running = loss if self.running == 0 else 0.9 * self.running + 0.1 * loss
        self.progress.update(self.task, advance=1, info=f"loss {self.running:.3f}")

    def end_epoch(self, row: dict) -> None:
        info = f"loss {row['train_loss']:.3f}  val_acc {row['val_acc']:.4f}  ({row['seconds']:.0f} s)"
        self.progress.update(self.task, info=info)
        if not self.progress.console.is_terminal:  # logs and CI: one line per epoch instead of a live bar
            self.progress.console.print(f"epoch {int(row['epoch']) + 1}: {info}", highlight=False)


@app.command()
@_user_errors
def train(
    recipe: Annotated[
        str, typer.Argument(help="Recipe YAML file, or the name of a shipped recipe (ferbench recipes lists them).")
    ],
    set_: Annotated[
        list[str] | None, typer.Option("--set", help="Override a recipe field: key.path=value (repeatable).")
    ] = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue from <output_dir>/last.pt, at its step.")] = False,
    gpus: Annotated[
        int | None,
        typer.Option(
            "--gpus", min=1, help="Train on N GPUs of this machine: launches torchrun with N processes (DDP)."
        ),
    ] = None,
) -> None:
    """Train a model from a recipe; writes checkpoints, summary.csv and an MLflow run, then evaluates on test.

    optim.batch_size is the global batch, so a recipe means the same on 1 or N GPUs. Under torchrun
    (torchrun --nproc-per-node N -m fer_bench train RECIPE, or --gpus N) each process trains its share and only
    rank 0 writes.
    """
    from fer_bench.runtime import launched_by_torchrun
    from fer_bench.train import fit, load_recipe, resolve_recipe

    recipe_path = resolve_recipe(recipe)
    config = load_recipe(recipe_path, set_ or [])
    if gpus is not None and not launched_by_torchrun():
        import subprocess

        import torch

        from fer_bench.errors import ConfigError
        from fer_bench.runtime import torchrun_command

        available = torch.cuda.device_count() if torch.cuda.is_available() else 0
        args = ["train", str(recipe_path), *(x for item in set_ or [] for x in ("--set", item))]
        args += ["--resume"] if resume else []
        if gpus > available:
            import shlex

            cpu = " ".join(shlex.quote(a) for a in [*args, "--set", "runtime.device=cpu"])
            raise ConfigError(
                f"--gpus {gpus}: this machine has {available} CUDA device(s). To run {gpus} processes on CPUs "
                f"instead: torchrun --standalone --nproc-per-node {gpus} -m fer_bench {cpu}"
            )
        raise typer.Exit(subprocess.call(torchrun_command(gpus, args)))
    from fer_bench.train.tracking import runs_page_url

    with _progress() as progress:
        result = fit(config, resume=resume, callbacks=_CliCallbacks(progress), recipe_path=recipe_path)
    out = result.output_dir
    stdout.print(f"best val accuracy {result.best_val_acc:.4f} at epoch {result.best_epoch + 1}; run folder {out}")
    if result.test_results:
        m = result.test_results["metrics"]
        stdout.print(
            f"[bold]{result.test_results['dataset']} {result.test_results['split']} accuracy {m['acc'] * 100:.2f} %[/]"
            f"  (mean class acc {m['mean_class_acc'] * 100:.2f} %, macro-F1 {m['macro_f1'] * 100:.2f} %)"
        )
        stdout.print(f"report: {out / 'eval' / 'report.md'}")
    if result.run_id:
        stdout.print(
            f"MLflow run {result.run_id}: mlflow ui --backend-store-uri {config.tracking.tracking_uri}, then "
            f"{runs_page_url(result.experiment_id)}",
            highlight=False,
        )


@app.command("recipes")
@_user_errors
def recipes_cmd() -> None:
    """The shipped recipes: name, what each trains, and what it needs (the dataset: --set data.root=DIR; a GPU;
    pretrained weights: from the hub, or --set model.pretrained=FILE). Train one with ferbench train NAME."""
    from fer_bench.train import shipped_recipes

    table = Table(title="shipped recipes (ferbench train NAME --set key=value ...)", expand=True)
    table.add_column("name", no_wrap=True)
    table.add_column("description", overflow="fold", ratio=2)
    table.add_column("needs", overflow="fold", ratio=1)
    for recipe in shipped_recipes():
        table.add_row(recipe.name, recipe.description, ", ".join(recipe.needs))
    stdout.print(table)


# ---------------------------------------------------------------------------------------------------------------------
# eval


def _log_eval_run(
    results: dict,
    paths: dict,
    *,
    tracking_uri: str,
    experiment: str,
    run_name: str,
    tags: dict,
    test_input=None,
) -> None:
    """A top-level MLflow run for ``ferbench eval`` (``test_input``: the scored rows as its dataset input)."""
    from fer_bench.train.tracking import Tracker, flat_metrics

    tracker = Tracker(
        enabled=True,
        tracking_uri=tracking_uri,
        experiment=experiment,
        run_name=run_name,
        warn=lambda m: console.print(m),
    )
    tracker.set_tags({"kind": "eval", **tags})
    if test_input is not None:
        tracker.log_inputs([test_input])
    tracker.log_metrics(flat_metrics(results))
    for path in paths.values():
        tracker.log_artifact(path, "eval")
    tracker.end()


def _print_results(results: dict, paths: dict) -> None:
    m, ci = results["metrics"], results.get("ci") or {}
    if results.get("cross_dataset"):
        cross = results["cross_dataset"]
        stdout.print(
            f"cross-dataset: scored on {len(cross['scored_classes'])} shared classes; masked logits "
            f"{cross['masked_logits'] or 'none'}; dropped rows {cross['dropped_rows'] or 'none'}",
            highlight=False,
        )
    name = (results.get("protocol") or {}).get("name", results["dataset"])
    table = Table(title=f"{name} / {results['split']}  (n = {results['n']})")
    for col in ("metric", "value", "95 % CI"):
        table.add_column(col)
    labels = {
        "acc": "accuracy",
        "mean_class_acc": "mean class accuracy",
        "macro_f1": "macro-F1",
        "weighted_f1": "weighted F1",
        "ece": "ECE",
        "nll": "NLL",
    }
    for key, label in labels.items():
        if key in m and m[key] is not None:
            bounds = ci.get(key)
            table.add_row(label, f"{m[key]:.4f}", f"[{bounds[0]:.4f}, {bounds[1]:.4f}]" if bounds else "")
    stdout.print(table)
    for column, f in results.get("fairness", {}).items():
        if "+" in column:
            continue
        gap, opp = f["max_gap"], f["eq_opp_gap"]
        text = lambda g: f"{g['value']:.4f}" + (f" [{g['ci'][0]:.4f}, {g['ci'][1]:.4f}]" if g["ci"] else "")  # noqa: E731
        if gap["value"] is not None and gap["value"] == gap["value"]:
            stdout.print(
                f"fairness {column}: worst-group acc {f['worst_group_acc']['value']:.4f}, max gap {text(gap)}, "
                f"eq. opp. gap {text(opp)} ({len(f['groups_compared'])} groups compared)",
                highlight=False,
            )
    if results.get("robustness"):
        rob = results["robustness"]
        stdout.print(f"robustness ({rob['perturbation']}): accuracy drop {rob['drop']['acc']:.4f}", highlight=False)
    heads = results.get("heads") or {}
    if heads.get("au_attention"):
        au = heads["au_attention"]
        stdout.print(
            f"AU attention ({au['attention']}, layer {au['layer']}): ATT-COS {au['att_cos']:.4f}, "
            f"CAM-COS {au['cam_cos']:.4f} ({au['n_maps']} {au['map_source']} AU maps)",
            highlight=False,
        )
    if heads.get("occlusion_detection"):
        det = heads["occlusion_detection"]
        stdout.print(
            "occluded patches: " + ", ".join(f"{k} {det[k]:.4f}" for k in ("precision", "recall", "f1", "iou")),
            highlight=False,
        )
    stdout.print(f"report: {paths['report']}")


OptionalRoot = Annotated[
    Path | None, typer.Option("--root", help="Dataset folder, as its owners distribute it (or give --cache).")
]
CacheFolder = Annotated[
    Path | None,
    typer.Option("--cache", help="Read the images from a prepared cache (ferbench data cache / data prepare)."),
]
AllowMismatch = Annotated[
    bool,
    typer.Option(
        "--allow-template-mismatch", help="Score faces framed differently from the model's training faces anyway."
    ),
]


def _protocol_data(protocol, *, root: Path | None, cache: Path | None, option: list[str] | None):
    from fer_bench.eval.protocols import protocol_data
    from fer_bench.options import parse_key_values

    return protocol_data(protocol, root=root, cache=cache, options=parse_key_values(option or [], flag="--option"))


def _check_alignment(state: dict, info, *, allow: bool) -> None:
    """Refuse faces framed differently from the checkpoint's training faces, unless allowed (then warn)."""
    from fer_bench.errors import ConfigError
    from fer_bench.eval.face_predict import alignment_mismatch

    problem = alignment_mismatch(state.get("face_framing"), info.extras.get("alignment"))
    if problem is None:
        return
    if not allow:
        raise ConfigError(
            f"{problem}; prepare matching faces (ferbench data prepare ... --align TEMPLATE) or pass "
            "--allow-template-mismatch to score anyway"
        )
    console.print(f"[yellow]warning:[/] {problem} (--allow-template-mismatch)", highlight=False, soft_wrap=True)


@app.command("eval")
@_user_errors
def eval_(
    dataset: Annotated[str, typer.Option("--dataset", help="Protocol or dataset name (ferbench data list).")],
    root: OptionalRoot = None,
    cache: CacheFolder = None,
    checkpoint: Annotated[Path | None, typer.Option("--checkpoint", help="A checkpoint written by train.")] = None,
    predictions: Annotated[
        Path | None, typer.Option("--predictions", help="A submission CSV to score instead of a checkpoint.")
    ] = None,
    option: OptionList = None,
    out: Annotated[Path | None, typer.Option("--out", help="Report folder (default: next to the input).")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print results.json to stdout.")] = False,
    bootstrap: Annotated[int, typer.Option("--bootstrap", min=0, help="Bootstrap resamples for CIs (0: none).")] = 1000,
    seed: Annotated[int, typer.Option("--seed", help="Bootstrap and perturbation seed.")] = 0,
    tta: Annotated[str | None, typer.Option("--tta", help="Test-time augmentation: flip.")] = None,
    perturb: Annotated[
        str | None, typer.Option("--perturb", help="occlusion | blur | noise | jpeg: score under a perturbation.")
    ] = None,
    min_group_size: Annotated[
        int, typer.Option("--min-group-size", min=1, help="Smaller groups are reported but left out of gaps.")
    ] = 30,
    batch_size: Annotated[
        int | None, typer.Option("--batch-size", min=1, help="Images per forward pass (default 128).")
    ] = None,
    tracking_uri: Annotated[
        str | None, typer.Option("--tracking-uri", help="MLflow store (default: the training run's, or mlflow.db).")
    ] = None,
    no_tracking: Annotated[bool, typer.Option("--no-tracking", help="Do not log to MLflow.")] = False,
    precision: Annotated[
        str, typer.Option("--precision", help="fp32 (what reports use) or bf16 autocast on GPUs / AVX-512 BF16 CPUs.")
    ] = "fp32",
    allow_template_mismatch: AllowMismatch = False,
) -> None:
    """Score a checkpoint or a submission under a fixed protocol.

    Headline metrics with bootstrap CIs, calibration, per-class and per-group tables, fairness gaps with CIs,
    dataset bias; written as results.json, report.md and PNG plots, and logged to MLflow.
    """
    from fer_bench.errors import ConfigError
    from fer_bench.eval import evaluate, get_protocol, write_report
    from fer_bench.eval.submission import score_submission

    if (checkpoint is None) == (predictions is None):
        raise ConfigError("give exactly one of --checkpoint PATH or --predictions FILE.csv")
    if precision not in ("fp32", "bf16"):
        raise ConfigError(f"--precision: expected fp32 or bf16, got {precision!r}")
    if predictions is not None:
        model_only = {
            "--tta": tta,
            "--perturb": perturb,
            "--batch-size": batch_size,
            "--precision": precision != "fp32",
        }
        given = [flag for flag, value in model_only.items() if value]
        if given:
            raise ConfigError(f"{', '.join(given)}: only with --checkpoint (a submission's predictions are fixed)")
    batch_size = batch_size or 128
    protocol = get_protocol(dataset)
    state = None
    if checkpoint is not None:  # read the (small) checkpoint before the (possibly large) dataset
        from fer_bench.models.checkpoint import load_checkpoint

        state = load_checkpoint(checkpoint)
    info = _protocol_data(protocol, root=root, cache=cache, option=option)
    if state is not None:
        _check_alignment(state, info, allow=allow_template_mismatch)
    if predictions is not None:
        results = score_submission(
            predictions, info, protocol, n_bootstrap=bootstrap, seed=seed, min_group_size=min_group_size
        )
        out = out or predictions.parent / f"eval-{protocol.name}"
    else:
        from fer_bench.models.checkpoint import model_from_checkpoint
        from fer_bench.runtime import resolve_device

        model = model_from_checkpoint(state)
        device = resolve_device("auto")
        with _progress() as progress:
            task = progress.add_task(f"eval {protocol.name}", total=None, info="")
            results = evaluate(
                model.to(device),
                info,
                protocol=protocol,
                img_size=int(state["model_config"]["img_size"]),
                label_names=tuple(state["label_names"]),
                batch_size=batch_size,
                device=device,
                tta=tta,
                perturb=perturb,
                perturb_seed=seed,
                n_bootstrap=bootstrap,
                seed=seed,
                min_group_size=min_group_size,
                progress=lambda k: progress.update(task, advance=k),
                precision=precision,
            )
        results["checkpoint"] = str(checkpoint)
        out = out or checkpoint.parent / (f"eval-{protocol.name}" + (f"-{perturb}" if perturb else ""))
    paths = write_report(results, out)
    if not no_tracking:
        from fer_bench.eval.protocols import protocol_rows
        from fer_bench.train.tracking import split_input

        recipe_tracking = (state or {}).get("recipe", {}).get("tracking", {})
        try:
            test_input = split_input(
                name=protocol.name,
                context="test",
                rows=protocol_rows(protocol, info),
                source=info.root,
                dataset_hash=results["dataset_hash"],
            )
        except Exception:  # an extra for the MLflow UI: never a reason to fail an evaluation
            test_input = None
        _log_eval_run(
            results,
            paths,
            tracking_uri=tracking_uri or recipe_tracking.get("tracking_uri", "sqlite:///mlflow.db"),
            experiment=recipe_tracking.get("experiment", "fer_bench"),
            run_name=f"eval-{protocol.name}",
            tags={
                "dataset": protocol.dataset,  # as training runs tag it: compare finds both
                "protocol": protocol.name,
                "protocol_version": str(protocol.version),
                "checkpoint": str(checkpoint or ""),
                "predictions": str(predictions or ""),
                "train_run_id": (state or {}).get("mlflow_run_id") or "",
                "backbone": (state or {}).get("model_config", {}).get("backbone", ""),
            },
            test_input=test_input,
        )
    if as_json:
        sys.stdout.write(paths["results"].read_text())
        return
    _print_results(results, paths)


DetectorName = Annotated[str, typer.Option("--detector", help="Face detector: mtcnn (CPU-friendly) or retinaface.")]
DetectorWeights = Annotated[
    Path | None,
    typer.Option(
        "--detector-weights",
        help="Detector weights: the RetinaFace release zip/.pth, or facenet-pytorch's wheel (or a folder with "
        "pnet.pt, rnet.pt, onet.pt) for MTCNN. Default: the usual places (README, 'Faces').",
    ),
]


def _detector(name: str, weights: Path | None, device, *, lazy: bool = False):
    from fer_bench.faces import create_detector

    return create_detector(name, weights=None if weights is None else str(weights), device=device, lazy=lazy)


@app.command("predict")
@_user_errors
def predict_cmd(
    checkpoint: Annotated[Path, typer.Option("--checkpoint", help="A checkpoint written by train.")],
    images: Annotated[
        list[Path] | None,
        typer.Option("--images", help="A photo, or a folder of photos; repeat for more: --images a.jpg --images b/"),
    ] = None,
    video: Annotated[Path | None, typer.Option("--video", help="A video file (decoded with OpenCV).")] = None,
    dataset: Annotated[
        str | None, typer.Option("--dataset", help="Protocol or dataset name: write a submission CSV instead.")
    ] = None,
    root: OptionalRoot = None,
    cache: CacheFolder = None,
    out: Annotated[
        Path | None,
        typer.Option(
            "--out", help="Table to write: faces.csv (default) or faces.parquet; a submission CSV with --dataset."
        ),
    ] = None,
    overlay: Annotated[
        Path | None, typer.Option("--overlay", help="Folder for annotated copies of the photos or the video.")
    ] = None,
    detector: DetectorName = "mtcnn",
    detector_weights: DetectorWeights = None,
    align: Annotated[
        str | None,
        typer.Option("--align", help="Align faces onto this template instead of the model's training framing."),
    ] = None,
    every: Annotated[int, typer.Option("--every", min=1, help="Video: look at every N-th frame.")] = 1,
    option: OptionList = None,
    tta: Annotated[str | None, typer.Option("--tta", help="Test-time augmentation (--dataset mode): flip.")] = None,
    batch_size: Annotated[
        int | None,
        typer.Option(
            "--batch-size",
            min=1,
            help="Photos or frames per batch (default 16), or images per forward (--dataset: 128).",
        ),
    ] = None,
    allow_template_mismatch: AllowMismatch = False,
) -> None:
    """Predict expressions: on photos or a video (detect, align, classify: a table with one row per face and
    annotated overlays), or on a dataset (a submission CSV, image_id + one probability column per class)."""
    from fer_bench.errors import ConfigError

    modes = [m for m, v in (("--images", images), ("--video", video), ("--dataset", dataset)) if v]
    if len(modes) != 1:
        raise ConfigError("give exactly one of --images PATH..., --video FILE or --dataset NAME")
    if dataset:
        if out is None:
            raise ConfigError("--dataset: give --out sub.csv, the submission to write")
        media_only = {
            "--overlay": overlay is not None,
            "--align": align is not None,
            "--every": every != 1,
            "--detector": detector != "mtcnn",
            "--detector-weights": detector_weights is not None,
        }
        given = [flag for flag, used in media_only.items() if used]
        if given:
            raise ConfigError(f"{', '.join(given)}: only for --images or --video (the dataset's faces are read as is)")
        batch_size = batch_size or 128
        _predict_dataset(
            checkpoint, dataset, root=root, cache=cache, out=out, option=option, tta=tta, batch_size=batch_size,
            allow=allow_template_mismatch,
        )  # fmt: skip
        return
    dataset_only = {"--tta": tta, "--root": root, "--cache": cache, "--option": option}
    given = [flag for flag, value in dataset_only.items() if value]
    if given:
        raise ConfigError(f"{', '.join(given)}: only with --dataset (a protocol's images)")
    _predict_faces(
        checkpoint,
        images=images,
        video=video,
        out=out or Path("faces.csv"),
        overlay=overlay,
        detector=detector,
        detector_weights=detector_weights,
        align=align,
        every=every,
        batch_size=batch_size or 16,
        allow=allow_template_mismatch,
    )


_DROPPED_OUTCOMES = ("dropped: no face", "dropped: several faces", "dropped: no landmarks")


def _predict_dataset(checkpoint, dataset, *, root, cache, out, option, tta, batch_size, allow) -> None:
    from fer_bench.eval import get_protocol
    from fer_bench.eval.submission import protocol_probabilities, write_submission
    from fer_bench.models.checkpoint import load_checkpoint, model_from_checkpoint
    from fer_bench.runtime import resolve_device

    protocol = get_protocol(dataset)
    state = load_checkpoint(checkpoint)
    info = _protocol_data(protocol, root=root, cache=cache, option=option)
    _check_alignment(state, info, allow=allow)
    device = resolve_device("auto")
    model = model_from_checkpoint(state).to(device)
    with _progress() as progress:
        task = progress.add_task(f"predict {protocol.name}", total=None, info="")
        ids, probs = protocol_probabilities(
            model,
            info,
            protocol,
            img_size=int(state["model_config"]["img_size"]),
            label_names=tuple(state["label_names"]),
            batch_size=batch_size,
            device=device,
            tta=tta,
            progress=lambda k: progress.update(task, advance=k),
        )
    write_submission(out, ids=ids, label_names=tuple(info.label_space.names), probs=probs)
    stdout.print(f"submission for {protocol.name}: {len(ids)} rows written to {out}")
    dropped = sum((info.extras.get("alignment") or {}).get("outcomes", {}).get(k, 0) for k in _DROPPED_OUTCOMES)
    if dropped:
        console.print(
            f"[yellow]warning:[/] the cache dropped {dropped} image(s) without a usable face (all splits): a "
            f"{protocol.name} submission missing test images is refused by eval and the leaderboards",
            highlight=False,
            soft_wrap=True,
        )


def _predict_faces(checkpoint, *, images, video, out, overlay, detector, detector_weights, align, every,
                   batch_size, allow) -> None:  # fmt: skip
    from fer_bench.errors import ConfigError
    from fer_bench.eval.face_predict import (
        FacePredictor,
        check_table_path,
        image_paths,
        model_framing,
        photo_frames,
        predict_media,
        video_frames,
        write_table,
    )
    from fer_bench.models.checkpoint import load_checkpoint, model_from_checkpoint
    from fer_bench.runtime import resolve_device

    check_table_path(out)
    if overlay is not None and overlay.exists() and not overlay.is_dir():
        raise ConfigError(f"--overlay {overlay}: is a file; give a folder for the annotated images")
    state = load_checkpoint(checkpoint)
    framing = model_framing(state.get("face_framing"), align=align, allow_mismatch=allow, checkpoint=checkpoint)
    device = resolve_device("auto")
    face_detector = _detector(detector, detector_weights, device)
    predictor = FacePredictor(
        model=model_from_checkpoint(state).to(device),
        detector=face_detector,
        framing=framing,
        img_size=int(state["model_config"]["img_size"]),
        label_names=list(state["label_names"]),
        device=device,
        track=video is not None,
    )
    if video is not None:
        import dataclasses

        frames, facts = video_frames(video, every=every)
        total, unit = (-(-facts.frames // every) if facts.frames else None), "frame(s)"
        facts = dataclasses.replace(facts, fps=(facts.fps or 25.0) / every)  # the overlay video's rate
        name = f"video {video.name}"
    else:
        paths = image_paths(images)
        frames, facts, total, unit, name = photo_frames(paths), None, len(paths), "image(s)", f"{len(paths)} image(s)"
    with _progress() as progress:
        task = progress.add_task(f"faces in {name}", total=total, info="")
        result = predict_media(
            predictor,
            frames,
            batch_size=batch_size,
            overlay=overlay,
            video=video,
            video_facts=facts,
            progress=lambda frames_done, faces: progress.update(task, advance=frames_done, info=f"{faces} faces"),
        )
    if result.no_face:
        shown = ", ".join(result.no_face[:5]) + (
            f" and {len(result.no_face) - 5} more" if len(result.no_face) > 5 else ""
        )
        console.print(
            f"[yellow]warning:[/] no face in {len(result.no_face)} of {result.frames_seen}: {shown}", highlight=False
        )
    extra = {
        "model": str(checkpoint),
        "framing": framing.get("template", ""),
        "detector": face_detector.name,
        "detector_weights": face_detector.weights_sha256[:16],
    }
    replaced = out.exists()
    table = write_table(result.records, out, extra=extra)
    flagged = int((table["small"] | table["blurry"]).sum())
    stdout.print(
        f"{len(table)} face(s) in {result.frames_seen} {unit}: table {out}"
        + (" (replaced)" if replaced else "")
        + (f"; {flagged} flagged small or blurry" if flagged else "")
        + (f"; overlays in {overlay}" if overlay is not None else ""),
        highlight=False,
    )
    counts = table["label"].value_counts()
    stdout.print("labels: " + ", ".join(f"{k} {v}" for k, v in counts.items()), highlight=False)


study_app = typer.Typer(
    help="Studies: the arms of a study file, each over several seeds, run and compared with a significance test "
    "(README 'Studies').",
    no_args_is_help=True,
)
app.add_typer(study_app, name="study")

StudyFile = Annotated[Path, typer.Argument(help="A study file (studies/NAME.yaml).")]


def _say(message: str) -> None:
    """One progress line of a study on stderr, never wrapped (paths and run ids stay whole for grep)."""
    console.print(message, highlight=False, markup=False, soft_wrap=True)


StudyOut = Annotated[
    Path | None, typer.Option("--out", help="The study's run folder (default: its output_dir, runs/studies/NAME).")
]


@study_app.command("run")
@_user_errors
def study_run(
    study: StudyFile,
    parallel: Annotated[int, typer.Option("--parallel", min=1, help="Runs at once on this machine.")] = 1,
    gpus: Annotated[
        int,
        typer.Option(
            "--gpus", min=0, help="GPUs of this machine, shared out among the parallel runs (DDP when one gets >1)."
        ),
    ] = 0,
    only: Annotated[list[str] | None, typer.Option("--only", help="Run only this arm (repeatable).")] = None,
    out: StudyOut = None,
) -> None:
    """Train every arm x seed of a study that is not finished yet (the pretraining run first).

    A finished run (same resolved recipe, found by its hash) is skipped; an interrupted one continues with --resume.
    Every run is an MLflow child of one study run, tagged with its arm and seed. Then: ferbench study report STUDY.
    """
    from fer_bench.train.study import load_study, run_study

    spec = load_study(study, output_dir=str(out) if out else None)
    outcomes = run_study(spec, parallel=parallel, gpus=gpus, only=only, message=_say)
    counts = {a: sum(1 for o in outcomes if o.action == a) for a in ("trained", "resumed", "skipped", "busy", "failed")}
    stdout.print(", ".join(f"{n} {a}" for a, n in counts.items() if n) + f"; runs in {spec.out}", highlight=False)
    if counts["failed"]:
        raise typer.Exit(1)
    stdout.print(f"next: ferbench study report {study}", highlight=False)


@study_app.command("commands")
@_user_errors
def study_commands(
    study: StudyFile,
    gpus_per_run: Annotated[
        int, typer.Option("--gpus-per-run", min=0, help="GPUs each run uses (>1: a torchrun DDP job).")
    ] = 0,
    out: StudyOut = None,
) -> None:
    """Print one self-contained shell command per run still to do, for any scheduler (a SLURM array, xargs -P).

    Each line changes to this folder and runs ferbench train with the run's settings, its tags and the parent
    study run; runs share the study's MLflow tracking URI, where ferbench study report finds them. While the
    pretraining run is not finished, only its command is printed (the arms start from its checkpoint).
    """
    from fer_bench.train.study import load_study, remote_runs, run_state, shell_line, study_parent_run, train_command

    spec = load_study(study, output_dir=str(out) if out else None)
    remote = set(remote_runs(spec, message=_say))
    states = {run.label: run_state(run, eval_sets=spec.spec.eval_sets(), remote_finished=remote) for run in spec.runs}
    todo = [run for run in spec.runs if states[run.label] in ("pending", "interrupted")]
    pretrain = spec.pretrain
    if pretrain is not None and states[pretrain.label] != "finished":
        todo = [pretrain] if pretrain in todo else []
        _say(
            "the arms start from the pretraining run's checkpoint: run this command first, then ferbench study "
            "commands again"
        )
    if not todo:
        finished = sum(state == "finished" for state in states.values())
        _say(f"nothing to run: {finished} of {len(states)} runs finished, the others running")
        return
    parent = study_parent_run(spec, message=_say)
    for run in todo:
        args = train_command(
            spec, run, parent_run_id=parent, resume=states[run.label] == "interrupted", gpus=gpus_per_run or None
        )
        print(shell_line(args, cwd=Path.cwd()))


@study_app.command("report")
@_user_errors
def study_report(
    study: StudyFile,
    out: StudyOut = None,
    report_dir: Annotated[
        Path | None, typer.Option("--report-dir", help="Where report.md goes (default: the study's folder).")
    ] = None,
    bootstrap: Annotated[int, typer.Option("--bootstrap", min=100, help="Test-image resamples.")] = 1000,
) -> None:
    """Compare a study's runs: per arm mean +- std and pooled CI; per pair the two-source paired Welch t test,
    Holm-adjusted, with a verdict; fairness gaps. Writes report.md, results.csv, results.json, arms.png, pairs.png.

    Runs are read from their folders, or from the MLflow store the study logs to (runs trained elsewhere).
    """
    from fer_bench.train.study import load_study
    from fer_bench.train.study_report import write_study_report

    spec = load_study(study, output_dir=str(out) if out else None)
    paths = write_study_report(spec, out=report_dir, n_resamples=bootstrap, message=_say)
    text = paths["report"].read_text()
    pairs = text.split("## Pairs", 1)[1].split("\n## ", 1)[0] if "## Pairs" in text else ""
    if pairs:
        stdout.print("Pairs" + pairs.rstrip(), highlight=False, markup=False)
    stdout.print(f"report: {paths['report']}; table: {paths['csv']}; plots: {paths['arms']}", highlight=False)


leaderboard_app = typer.Typer(
    help="Leaderboards: submission templates, verified submissions, tables.", no_args_is_help=True
)
app.add_typer(leaderboard_app, name="leaderboard")


@leaderboard_app.command("template")
@_user_errors
def leaderboard_template(
    dataset: Annotated[str, typer.Option("--dataset", help="Protocol name.")],
    root: DatasetRoot,
    out: Annotated[Path, typer.Option("--out", help="CSV to write (ids and the expected header).")],
    option: OptionList = None,
) -> None:
    """Write the id column and the expected header of a submission for a protocol."""
    from fer_bench.eval import get_protocol, load_protocol_data, protocol_rows
    from fer_bench.eval.submission import write_submission
    from fer_bench.options import parse_key_values

    protocol = get_protocol(dataset)
    info = load_protocol_data(protocol, root, parse_key_values(option or [], flag="--option"))
    ids = protocol_rows(protocol, info)["image_id"].astype(str).tolist()
    write_submission(out, ids=ids, label_names=tuple(info.label_space.names))
    stdout.print(
        f"template for {protocol.name}: {len(ids)} ids, columns image_id + p_<class> (or use a single "
        f"'prediction' column of class names) -> {out}"
    )


@leaderboard_app.command("submit")
@_user_errors
def leaderboard_submit(
    submission: Annotated[Path, typer.Argument(help="Submission CSV.")],
    dataset: Annotated[str, typer.Option("--dataset", help="Protocol name.")],
    root: DatasetRoot,
    meta: Annotated[Path, typer.Option("--meta", help="Sidecar YAML: model, backbone, params_m, pretrain, ...")],
    option: OptionList = None,
    boards: Annotated[
        Path | None,
        typer.Option(
            "--boards",
            "--leaderboards",
            help="Your boards folder (default ./leaderboards when it exists here); created, and the protocol's "
            "board seeded from the shipped one, on the first submission.",
        ),
    ] = None,
    bootstrap: Annotated[int, typer.Option("--bootstrap", min=0, help="Bootstrap resamples.")] = 1000,
) -> None:
    """Score a submission and add it to BOARDS/<protocol>.csv (atomic; the same file twice is refused)."""
    from fer_bench.eval import get_protocol, load_protocol_data, write_report
    from fer_bench.eval.leaderboard import add_entry, boards_to_write, entry_from_results, seed_board
    from fer_bench.eval.submission import read_meta, score_submission
    from fer_bench.options import parse_key_values

    metadata = read_meta(meta)
    protocol = get_protocol(dataset)
    folder = boards_to_write(boards)  # before the scoring: a run from the wrong folder fails at once
    info = load_protocol_data(protocol, root, parse_key_values(option or [], flag="--option"))
    results = score_submission(submission, info, protocol, n_bootstrap=bootstrap)
    write_report(results, submission.parent / f"eval-{protocol.name}")
    entry = entry_from_results(results, metadata, results["predictions_sha256"])
    path = seed_board(protocol.name, folder)
    rows = add_entry(path, entry)
    rank = next(r["rank"] for r in rows if r["submission_sha256"] == entry["submission_sha256"])
    stdout.print(
        f"{metadata['model']}: accuracy {results['metrics']['acc'] * 100:.2f} %, rank {rank} of {len(rows)} on {path}",
        highlight=False,
    )


@leaderboard_app.command("show")
@_user_errors
def leaderboard_show(
    name: Annotated[str, typer.Argument(help="Protocol name (BOARDS/<name>.csv).")],
    sort: Annotated[str, typer.Option("--sort", help="Column to sort by.")] = "acc",
    boards: Annotated[
        Path | None,
        typer.Option(
            "--boards",
            "--leaderboards",
            help="Boards folder (default ./leaderboards when it exists here, else the boards fer_bench ships).",
        ),
    ] = None,
) -> None:
    """Print a leaderboard."""
    from fer_bench.errors import DataError
    from fer_bench.eval.leaderboard import boards_to_read, leaderboard_path, ranked, read_leaderboard

    path = leaderboard_path(name, boards_to_read(boards))
    if not path.is_file():
        available = sorted(p.stem for p in path.parent.glob("*.csv"))
        raise DataError(f"{path}: no such leaderboard; available: {available}")
    rows = ranked(read_leaderboard(path), sort)
    table = Table(title=f"{name} (sorted by {sort})")
    percent = ("acc", "mean_class_acc", "macro_f1", "worst_group_acc", "max_group_gap")
    for column in (
        "rank",
        "model",
        "backbone",
        "acc % (95 % CI)",
        "mean class acc %",
        "macro-F1 %",
        "worst-group acc %",
        "max gap",
        "source",
    ):
        table.add_column(column, overflow="fold")

    def pct(value: str) -> str:
        try:
            return f"{float(value) * 100:.2f}"
        except ValueError:
            return ""

    for row in rows:
        ci = f" ({pct(row['acc_ci_low'])}-{pct(row['acc_ci_high'])})" if row["acc_ci_low"] else ""
        table.add_row(
            row["rank"],
            row["model"],
            row["backbone"],
            pct(row["acc"]) + ci,
            *(pct(row[c]) for c in percent[1:]),
            row["source"],
        )
    stdout.print(table)


@app.command("compare")
@_user_errors
def compare_cmd(
    experiment: Annotated[str | None, typer.Option("--experiment", help="MLflow experiment (default: all).")] = None,
    dataset: Annotated[str | None, typer.Option("--dataset", help="Only runs tagged with this dataset.")] = None,
    a: Annotated[Path | None, typer.Option("--a", help="Submission A (with --b and --root: paired test).")] = None,
    b: Annotated[Path | None, typer.Option("--b", help="Submission B.")] = None,
    root: Annotated[Path | None, typer.Option("--root", help="Dataset folder (for --a/--b).")] = None,
    bootstrap: Annotated[int, typer.Option("--bootstrap", min=10, help="Resamples for the paired test.")] = 1000,
    metric: Annotated[str, typer.Option("--metric", help="Metric to rank by (acc, macro_f1, ece, ...).")] = "acc",
    tracking_uri: Annotated[str, typer.Option("--tracking-uri", help="MLflow store.")] = "sqlite:///mlflow.db",
    plot: Annotated[
        Path | None,
        typer.Option("--plot", help="Comparison plot to write (default: comparison.png beside a sqlite store)."),
    ] = None,
) -> None:
    """Rank MLflow runs by a test metric, with CIs and fairness columns, and write a comparison plot.

    With --a A.csv --b B.csv --dataset NAME --root DIR: a paired bootstrap test of two submissions instead.
    """
    from fer_bench.eval.compare import compare_runs, comparison_plot
    from fer_bench.train.tracking import runs_page_url

    if a is not None or b is not None:
        from fer_bench.errors import ConfigError
        from fer_bench.eval import get_protocol, load_protocol_data
        from fer_bench.eval.submission import compare_submissions

        if a is None or b is None or root is None or dataset is None:
            raise ConfigError("a paired test needs --a, --b, --dataset and --root")
        protocol = get_protocol(dataset)
        tests = compare_submissions(a, b, load_protocol_data(protocol, root), protocol, n_bootstrap=bootstrap)
        view = Table(title=f"{a.name} vs {b.name} on {protocol.name} (paired bootstrap, {bootstrap} resamples)")
        for column in ("metric", "A - B", "95 % CI", "p (A beats B)"):
            view.add_column(column)
        for key, r in tests.items():
            view.add_row(key, f"{r['delta']:+.4f}", f"[{r['ci_low']:+.4f}, {r['ci_high']:+.4f}]", f"{r['p_value']:.4f}")
        stdout.print(view)
        return

    table = compare_runs(tracking_uri=tracking_uri, experiment=experiment, dataset=dataset, metric=metric)
    if table.empty:
        stdout.print(f"no finished runs with test/{metric} in {tracking_uri}")
        return
    # fits 80 columns: names fold rather than being cut, figures in percent, each gap says which group column
    view = Table(title=f"runs ranked by test/{metric}", expand=False, pad_edge=False)
    view.add_column("run (experiment)", overflow="fold", ratio=3)
    view.add_column("protocol", overflow="fold", ratio=1)
    view.add_column(
        f"{metric}{' %' if metric not in ('nll', 'brier') else ''} (95 % CI)", overflow="fold", justify="right"
    )
    view.add_column("mean cls / F1", justify="right")
    view.add_column("worst gap (column)", overflow="fold")
    pct = lambda v: "" if v != v else f"{100 * v:.1f}"  # noqa: E731
    # fractions in percent; NLL and Brier as they are
    own = pct if metric not in ("nll", "brier") else (lambda v: "" if v != v else f"{v:.4f}")  # noqa: E731
    for r in table.to_dict(orient="records"):
        gap = f"{pct(r['max_group_gap'])} ({r['max_group_gap_column']})" if r["max_group_gap_column"] else ""
        view.add_row(
            f"{r['run_name'] or r['run_id'][:8]} ({r['experiment']})",
            str(r.get("protocol") if isinstance(r.get("protocol"), str) else r["dataset"]),
            f"{own(r[metric])} [{own(r[f'{metric}_ci_low'])}, {own(r[f'{metric}_ci_high'])}]",
            f"{pct(r['mean_class_acc'])} / {pct(r['macro_f1'])}",
            gap,
        )
    if plot is None:
        store = tracking_uri.removeprefix("sqlite:///") if tracking_uri.startswith("sqlite:///") else None
        plot = (Path(store).parent if store else Path(".")) / "comparison.png"
    stdout.print(view)
    stdout.print(
        f"plot: {comparison_plot(table, metric=metric, path=plot)}; the same runs in MLflow's own UI: "
        f"mlflow ui --backend-store-uri {tracking_uri}, then "
        f"{runs_page_url(ids[0] if len(ids := table['experiment_id'].unique()) == 1 else None)}",
        highlight=False,
    )


# ---------------------------------------------------------------------------------------------------------------------
# data


@data_app.command("synth")
@_user_errors
def data_synth(
    out: Annotated[Path, typer.Option("--out", help="Folder to create.")],
    seed: Annotated[int, typer.Option(help="Master seed.")] = 0,
    size: Annotated[int, typer.Option(help="Image side in pixels (multiple of 8).")] = 112,
    n_train: Annotated[int, typer.Option("--n-train", help="Training images.")] = 6000,
    n_val: Annotated[int, typer.Option("--n-val", help="Validation images.")] = 1000,
    n_test: Annotated[int, typer.Option("--n-test", help="Test images.")] = 2000,
    label_space: Annotated[str, typer.Option("--label-space", help="all8 or basic7.")] = "all8",
    min_intensity: Annotated[float, typer.Option("--min-intensity", help="Lowest expression intensity.")] = 0.1,
    occlusion: Annotated[float, typer.Option("--occlusion", help="Fraction of images with an occluder.")] = 0.15,
    label_noise: Annotated[float, typer.Option("--label-noise", help="Fraction of training labels flipped.")] = 0.0,
    noise_type: Annotated[str, typer.Option("--noise-type", help="symmetric or class_dependent.")] = "symmetric",
    bias: Annotated[float, typer.Option("--bias", help="Label/skin-tone correlation in the training split.")] = 0.0,
    workers: Annotated[int | None, typer.Option("--workers", help="Processes (default: all cores).")] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an existing folder.")] = False,
) -> None:
    """Generate SynthFER, the procedurally rendered benchmark with known ground truth."""
    from fer_bench.data import SynthFERConfig, generate_synthfer
    from fer_bench.data.synthfer import check_output_folder

    check_output_folder(out, overwrite=overwrite)
    config = SynthFERConfig(
        seed=seed,
        size=size,
        n_train=n_train,
        n_val=n_val,
        n_test=n_test,
        label_space=label_space,
        min_intensity=min_intensity,
        occlusion_fraction=occlusion,
        label_noise=label_noise,
        noise_type=noise_type,
        bias=bias,
    )
    total = n_train + n_val + n_test
    with _progress() as progress:
        task = progress.add_task("rendering SynthFER", total=total, info="")
        path = generate_synthfer(
            out=out,
            config=config,
            workers=workers,
            overwrite=overwrite,
            progress=lambda done, _total: progress.update(task, completed=done),
        )
    stdout.print(f"SynthFER written to {path} ({total} images)")


def _load_dataset(dataset: str, root: Path, option: list[str] | None):
    """Read a dataset (or a protocol's dataset, with the options the protocol fixes) with its --option values;
    returns (info, every adapter option with defaults filled in)."""
    from fer_bench.data import dataset_options
    from fer_bench.eval import get_protocol, load_protocol_data
    from fer_bench.options import parse_key_values

    options = parse_key_values(option or [], flag="--option")
    protocol = get_protocol(dataset)
    info = load_protocol_data(protocol, root, options)
    return info, {**dataset_options(protocol.dataset), **options, **protocol.options}


@data_app.command("describe")
@_user_errors
def data_describe(
    dataset: Annotated[
        str | None, typer.Option("--dataset", help="Dataset name (ferbench data list shows them).")
    ] = None,
    root: OptionalRoot = None,
    cache: Annotated[
        Path | None, typer.Option("--cache", help="Describe a prepared cache instead (its alignment included).")
    ] = None,
    option: OptionList = None,
    as_json: Annotated[
        bool,
        typer.Option(
            "--json", help="Print JSON (keys: dataset, layout, label_space, splits, groups, subsets, dropped)."
        ),
    ] = False,
) -> None:
    """Layout found, counts per split and label, group columns with their values, subsets and dropped rows.

    Split sizes are compared with the dataset card (datasets/NAME.yaml); a mismatch is a warning on stderr.
    """
    from fer_bench.data import count_warnings, describe_dataset, load_card
    from fer_bench.errors import ConfigError

    if cache is not None:
        from fer_bench.data.cache import describe_alignment, open_cache, read_cache_card
        from fer_bench.data.prepare import outcome_text

        info = open_cache(cache)
        card = read_cache_card(cache)
        options = card["parameters"].get("options", {})
        alignment = card.get("alignment")
        dataset, root = info.name, cache
        extra_lines = [
            f"alignment: {describe_alignment(alignment).removeprefix('aligned to ') or 'none (the dataset crops)'}"
        ]
        if alignment:
            extra_lines.append(f"faces: {outcome_text(alignment.get('outcomes', {}))}")
            extra_lines.append(f"68-point landmarks: {alignment.get('landmarks68', '')}")
    elif dataset is None or root is None:
        raise ConfigError("give --dataset NAME --root DIR, or --cache FOLDER")
    else:
        info, options = _load_dataset(dataset, root, option)
        extra_lines = []
    summary = describe_dataset(info)
    if cache is not None:
        summary["cache"] = {"folder": str(cache), "alignment": card.get("alignment")}
    warnings = count_warnings(info, summary, options=options, card=load_card(info.name))
    for line in warnings:
        console.print(f"[yellow]warning:[/] {dataset} at {root}: {line}", highlight=False, soft_wrap=True)
    if as_json:
        sys.stdout.write(json.dumps(summary, indent=2) + "\n")
        return
    stdout.print(f"[bold]{summary['dataset']}[/] at {root}", highlight=False)
    stdout.print(f"layout: {summary['layout']}", highlight=False)
    if info.splits:
        stdout.print(f"splits: {info.splits}", highlight=False)
    for line in extra_lines:
        stdout.print(line, highlight=False)
    table = Table(title="images per split and label")
    table.add_column("label")
    for split in summary["splits"]:
        table.add_column(split, justify="right")
    for name in summary["label_space"]:
        table.add_row(name, *(str(s["per_label"][name]) for s in summary["splits"].values()))
    table.add_row("[bold]total", *(f"[bold]{s['total']}" for s in summary["splits"].values()))
    stdout.print(table)
    for column, values in summary["groups"].items():
        stdout.print(f"group {column}: " + ", ".join(f"{k} {v}" for k, v in values.items()), highlight=False)
    for column, count in summary["subsets"].items():
        stdout.print(f"subset {column}: {count}", highlight=False)
    if summary["dropped"]:
        stdout.print("dropped: " + ", ".join(f"{k} {v}" for k, v in summary["dropped"].items()), highlight=False)
    for note in info.notes:
        stdout.print(f"note: {note}", highlight=False)


@data_app.command("cache")
@_user_errors
def data_cache(
    dataset: DatasetName,
    root: DatasetRoot,
    option: OptionList = None,
    size: Annotated[int, typer.Option("--size", min=16, max=1024, help="Side of the cached images in pixels.")] = 256,
    out: Annotated[
        Path | None,
        typer.Option(
            "--out", help="Cache folder (default: the one data.cache: auto uses, under $FER_BENCH_CACHE_DIR)."
        ),
    ] = None,
    workers: Annotated[
        int | None, typer.Option("--workers", min=1, help="Decoding processes (default: all cores).")
    ] = None,
) -> None:
    """Prepare the uint8 cache of a dataset: decode every image once, in parallel, crop and resize it.

    Writes one NHWC array per split, a parquet table of the rows and cache.yaml. An existing cache is reused when
    the dataset and the parameters are unchanged, and rebuilt (saying why) otherwise. Train from it with
    --set data.cache=FOLDER.
    """
    from fer_bench.data.cache import auto_cache_dir, cached_dataset, check_cache_folder

    info, options = _load_dataset(dataset, root, option)
    folder = out or auto_cache_dir(info.name, root, size=size, options=options)
    check_cache_folder(folder)  # before the progress bar: a wrong --out is one line
    with _progress() as progress:
        task = progress.add_task(f"caching {dataset}", total=len(info.manifest), info="")
        cached = cached_dataset(
            info,
            cache=str(folder),
            size=size,
            options=options,
            workers=workers,
            progress=lambda done, _total: progress.update(task, completed=done),
            message=lambda text: progress.console.print(text, highlight=False, soft_wrap=True),
        )
    images = cached.extra("images")
    gib = len(images) * size * size * 3 / 2**30
    counts = ", ".join(f"{split} {count}" for split, count in images.counts.items())
    stdout.print(f"cache {folder}: {counts} ({gib:.2f} GiB at {size} px)", highlight=False)
    stdout.print(f"train from it: ferbench train RECIPE --set data.cache={folder}", highlight=False)


@data_app.command("prepare")
@_user_errors
def data_prepare(
    dataset: DatasetName,
    root: DatasetRoot,
    align: Annotated[str, typer.Option("--align", help="Template: arcface112, arcface224, rafdb_like or ffhq512.")],
    option: OptionList = None,
    detector: DetectorName = "mtcnn",
    detector_weights: DetectorWeights = None,
    landmarks: Annotated[
        str,
        typer.Option(
            "--landmarks",
            help="detector: find the faces; dataset: use the landmarks the dataset ships (RAF-DB, AffectNet).",
        ),
    ] = "detector",
    select: Annotated[
        str,
        typer.Option("--select", help="An image with several faces: largest, confident (most) or drop."),
    ] = "largest",
    size: Annotated[
        int | None,
        typer.Option("--size", min=16, max=1024, help="Side of the aligned crops (default: the template's)."),
    ] = None,
    out: Annotated[
        Path | None, typer.Option("--out", help="Cache folder (default: one per dataset, alignment and size).")
    ] = None,
    workers: Annotated[
        int | None, typer.Option("--workers", min=1, help="Warping processes (default: all cores).")
    ] = None,
) -> None:
    """Detect, align and cache every face of a dataset: the prepared-cache format training and eval read.

    Each image's face is found (or its shipped landmarks read), aligned onto the template by a least-squares
    similarity and written at --size. Images with no face, or with several, are counted by reason in cache.yaml
    (several: the one inside the dataset's face box if it has one, else --select). The template, detector,
    weights' SHA-256 and each detection score are recorded. Train on it with --set data.cache=FOLDER; evaluate
    with ferbench eval --cache FOLDER.
    """
    from fer_bench.data.cache import check_cache_folder, describe_alignment
    from fer_bench.data.prepare import cache_alignment, check_alignment_choices, outcome_text, prepare_aligned
    from fer_bench.errors import ConfigError
    from fer_bench.runtime import resolve_device

    check_alignment_choices(template=align, landmarks=landmarks, select=select)
    if landmarks == "dataset" and (detector != "mtcnn" or detector_weights is not None):
        raise ConfigError("--detector/--detector-weights: not used with --landmarks dataset (no detection is run)")
    if out is not None:
        check_cache_folder(out)
    face_detector = None
    if landmarks == "detector":
        face_detector = _detector(
            detector, detector_weights, resolve_device("auto"), lazy=True
        )  # a fresh cache: unused
    info, options = _load_dataset(dataset, root, option)
    with _progress() as progress:
        tasks: dict[str, int] = {}

        def advance(stage: str, done: int, total: int) -> None:
            if stage not in tasks:
                tasks[stage] = progress.add_task(f"{stage} {dataset}", total=total, info="")
            progress.update(tasks[stage], completed=done)

        folder = prepare_aligned(
            info,
            template=align,
            size=size,
            landmarks=landmarks,
            detector=face_detector,
            select=select,
            out=out,
            options=options,
            workers=workers,
            progress=advance,
            message=lambda text: progress.console.print(text, highlight=False, soft_wrap=True),
        )
    record = cache_alignment(folder)
    stdout.print(
        f"cache {folder}: faces{describe_alignment(record, prefix=' ')} at {record['size']} px", highlight=False
    )
    stdout.print(f"faces: {outcome_text(record['outcomes'])}", highlight=False)
    stdout.print(f"train on it: ferbench train RECIPE --set data.cache={folder}", highlight=False)
    stdout.print(f"evaluate on it: ferbench eval --dataset {dataset} --cache {folder} --checkpoint C", highlight=False)


@data_app.command("verify")
@_user_errors
def data_verify(
    dataset: DatasetName,
    root: DatasetRoot,
    option: OptionList = None,
) -> None:
    """Decode every image; list missing or corrupt files (count and the first 20). Exit code 2 if any."""
    from fer_bench.data import verify_images

    info, _ = _load_dataset(dataset, root, option)
    with _progress() as progress:
        task = progress.add_task(f"decoding {dataset}", total=len(info.manifest), info="")
        report = verify_images(info, progress=lambda k: progress.update(task, advance=k))
    problems = report["problems"]
    for note, count in report.get("converted", {}).items():
        console.print(f"note: {count} image(s) {note}", highlight=False)
    if problems:
        for image_id, path, message in problems[:20]:
            console.print(f"  {path or image_id}: {message}", highlight=False, soft_wrap=True)
        more = " (first 20 shown)" if len(problems) > 20 else ""
        _fail(f"{dataset} at {root}: {len(problems)} of {report['checked']} images missing or corrupt{more}")
    stdout.print(f"{dataset} at {root}: all {report['checked']} images decode")


@data_app.command("list")
def data_list() -> None:
    """The evaluation protocols, the dataset names and the options each adapter takes."""
    from fer_bench.data import dataset_options, list_datasets
    from fer_bench.eval import get_protocol, list_protocols

    for name in list_protocols():
        protocol = get_protocol(name)
        stdout.print(f"[bold]{name}[/] (protocol v{protocol.version}): {protocol.description}", highlight=False)
    stdout.print("")

    for name in list_datasets():
        options = ", ".join(f"{k}={v}" for k, v in dataset_options(name).items()) or "-"
        stdout.print(f"[bold]{name}[/]  options: {options}", highlight=False)


def main() -> None:
    """The ``ferbench`` entry point: usage errors (a bad option value, a missing option) are one line too."""
    try:  # recent typer vendors its own click (Abort then lives in typer.exceptions)
        from typer._click import exceptions as click_exceptions
    except ImportError:
        from click import exceptions as click_exceptions
    usage_error = click_exceptions.UsageError
    no_args = getattr(click_exceptions, "NoArgsIsHelpError", ())  # click >= 8.2
    abort = getattr(click_exceptions, "Abort", None) or getattr(typer, "Abort", None) or KeyboardInterrupt

    try:
        code = app(standalone_mode=False)
    except no_args as exc:  # ``ferbench data``: the help, as typer would print it
        console.print(exc.ctx.get_help() if exc.ctx else str(exc), highlight=False)
        raise SystemExit(2) from None
    except usage_error as exc:
        where = f"{exc.ctx.command_path}: " if exc.ctx else ""
        hint = f" (see {exc.ctx.command_path} --help)" if exc.ctx else ""
        console.print(f"[bold red]error:[/] {where}{exc.format_message()}{hint}", highlight=False, soft_wrap=True)
        raise SystemExit(2) from None
    except abort:
        console.print("aborted", highlight=False)
        raise SystemExit(130) from None
    raise SystemExit(code if isinstance(code, int) else 0)


if __name__ == "__main__":
    main()
