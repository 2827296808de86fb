"""The ``ferbench`` command line: parse, call one library function, print. Nothing imports this module.

Only :class:`fer_bench.errors.FerBenchError` becomes a one-line message with exit code 2; anything else is a bug
and keeps its traceback.
"""

from __future__ import annotations

import functools
import json
import logging
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
    help="Datasets: list adapters, describe and verify a dataset, generate SynthFER.", no_args_is_help=True
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
        disable=not console.is_terminal and False,
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


# ---------------------------------------------------------------------------------------------------------------------
# train


class _CliCallbacks:
    def __init__(self, progress: Progress) -> None:
        self.progress = progress
        self.task = None
        self.running = 0.0

    def message(self, text: str) -> None:
        self.progress.console.print(text, highlight=False)

    def start_epoch(self, epoch: int, epochs: int, steps: int) -> None:
        self.task = self.progress.add_task(f"epoch {epoch + 1}/{epochs}", total=steps, info="")
        self.running = 0.0

    def step(self, loss: float) -> None:
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
    recipe: Annotated[Path, typer.Argument(help="Recipe YAML file (see recipes/).")],
    set_: Annotated[
        list[str] | None, typer.Option("--set", help="Override a recipe field: key.path=value (repeatable).")
    ] = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue from <output_dir>/last.pt.")] = False,
) -> None:
    """Train a model from a recipe; writes checkpoints, summary.csv and an MLflow run, then evaluates on test."""
    from fer_bench.train import fit, load_recipe

    config = load_recipe(recipe, set_ or [])
    with _progress() as progress:
        result = fit(config, resume=resume, callbacks=_CliCallbacks(progress), recipe_path=recipe)
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
            f"MLflow run {result.run_id}: mlflow ui --backend-store-uri {config.tracking.tracking_uri}", highlight=False
        )


# ---------------------------------------------------------------------------------------------------------------------
# eval


@app.command("eval")
@_user_errors
def eval_(
    dataset: DatasetName,
    root: DatasetRoot,
    checkpoint: Annotated[Path, typer.Option("--checkpoint", help="A checkpoint written by ferbench train.")],
    option: OptionList = None,
    split: Annotated[str, typer.Option("--split", help="Split to score.")] = "test",
    out: Annotated[
        Path | None, typer.Option("--out", help="Report folder (default: <checkpoint dir>/eval-<split>).")
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print results.json to stdout.")] = False,
    batch_size: Annotated[int, typer.Option("--batch-size", min=1, help="Images per forward pass.")] = 128,
    tracking_uri: Annotated[
        str | None, typer.Option("--tracking-uri", help="Log to this MLflow store (default: the training run's).")
    ] = None,
    no_tracking: Annotated[bool, typer.Option("--no-tracking", help="Do not log to MLflow.")] = False,
) -> None:
    """Evaluate a checkpoint on a dataset split.

    Accuracy, mean class accuracy, macro-F1, per-class table, confusion matrix and accuracy per group and subset
    column, written as results.json, report.md and confusion_matrix.png, and logged to MLflow.
    """
    from fer_bench.eval import evaluate, write_report
    from fer_bench.models.checkpoint import load_checkpoint, model_from_checkpoint
    from fer_bench.train.fit import resolve_device
    from fer_bench.train.tracking import Tracker

    state = load_checkpoint(checkpoint)
    model = model_from_checkpoint(state)
    info, _ = _load_dataset(dataset, root, option)
    device = resolve_device("auto")
    n = len(info.split(split))
    with _progress() as progress:
        task = progress.add_task(f"eval {dataset}/{split}", total=n, info="")
        results = evaluate(
            model.to(device),
            info,
            split=split,
            img_size=int(state["model_config"]["img_size"]),
            label_names=tuple(state["label_names"]),
            batch_size=batch_size,
            device=device,
            progress=lambda k: progress.update(task, advance=k),
        )
    results["checkpoint"] = str(checkpoint)
    out = out or checkpoint.parent / f"eval-{split}"
    paths = write_report(results, out)
    if not no_tracking:
        uri = tracking_uri or state["recipe"].get("tracking", {}).get("tracking_uri", "sqlite:///mlflow.db")
        experiment = state["recipe"].get("tracking", {}).get("experiment", "fer_bench")
        tracker = Tracker(
            enabled=True,
            tracking_uri=uri,
            experiment=experiment,
            run_name=f"eval-{dataset}-{split}",
            warn=lambda m: console.print(m),
        )
        tracker.set_tags(
            {
                "kind": "eval",
                "dataset": dataset,
                "checkpoint": str(checkpoint),
                "train_run_id": state.get("mlflow_run_id") or "",
            }
        )
        tracker.log_metrics({f"{split}/{k}": v for k, v in results["metrics"].items()})
        for path in paths.values():
            tracker.log_artifact(path, "eval")
        tracker.end()
    if as_json:
        sys.stdout.write(paths["results"].read_text())
        return
    m = results["metrics"]
    if results.get("cross_dataset"):
        cross = results["cross_dataset"]
        stdout.print(
            f"cross-dataset: scored on {len(cross['scored_classes'])} shared classes; masked logits "
            f"{cross['masked_logits'] or 'none'}; dropped rows {cross['dropped_rows'] or 'none'}",
            highlight=False,
        )
    table = Table(title=f"{dataset} / {split}  (n = {results['n']})")
    for col in ("metric", "value"):
        table.add_column(col)
    for key, label in (("acc", "accuracy"), ("mean_class_acc", "mean class accuracy"), ("macro_f1", "macro-F1")):
        table.add_row(label, f"{m[key]:.4f}")
    stdout.print(table)
    stdout.print(f"report: {paths['report']}")


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
    """Read a dataset with its --option values; returns (info, every option with defaults filled in)."""
    from fer_bench.data import dataset_options, get_dataset
    from fer_bench.options import parse_key_values

    options = parse_key_values(option or [], flag="--option")
    info = get_dataset(dataset, root, **options)
    return info, {**dataset_options(dataset), **options}


@data_app.command("describe")
@_user_errors
def data_describe(
    dataset: DatasetName,
    root: DatasetRoot,
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

    info, options = _load_dataset(dataset, root, option)
    summary = describe_dataset(info)
    warnings = count_warnings(info, summary, options=options, card=load_card(dataset))
    for line in warnings:
        console.print(f"[yellow]warning:[/] {dataset} at {root}: {line}", highlight=False, soft_wrap=True)
    if as_json:
        sys.stdout.write(json.dumps(summary, indent=2) + "\n")
        return
    stdout.print(f"[bold]{summary['dataset']}[/] at {root}", highlight=False)
    stdout.print(f"layout: {summary['layout']}", highlight=False)
    if info.protocol:
        stdout.print(f"protocol: {info.protocol}", highlight=False)
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
    if problems:
        for image_id, path, message in problems[:20]:
            console.print(f"  {path or image_id}: {message}", highlight=False, soft_wrap=True)
        more = " (first 20 shown)" if len(problems) > 20 else ""
        _fail(f"{dataset} at {root}: {len(problems)} of {report['checked']} images missing or corrupt{more}")
    stdout.print(f"{dataset} at {root}: all {report['checked']} images decode")


@data_app.command("list")
def data_list() -> None:
    """The dataset names and the options each adapter takes."""
    from fer_bench.data import dataset_options, list_datasets

    for name in list_datasets():
        options = ", ".join(f"{k}={v}" for k, v in dataset_options(name).items()) or "-"
        stdout.print(f"[bold]{name}[/]  options: {options}", highlight=False)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
