"""``fit``: build → restore → loop → evaluate the best. The one place a recipe is unpacked.

The pieces live next door: the runtime (device, precision, seeds, the distributed context) in
:mod:`fer_bench.runtime`, the data (cache, loaders) in :mod:`fer_bench.train.data_setup`, the step and validation in
:mod:`fer_bench.train.loop`, the checkpoint set in :mod:`fer_bench.train.checkpoints`.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml

from fer_bench import __version__
from fer_bench._io import atomic_write_text
from fer_bench.data.prepare import face_framing
from fer_bench.errors import ConfigError
from fer_bench.eval import evaluate, write_report
from fer_bench.eval.protocols import protocol_of, protocol_rows
from fer_bench.models import FerModel, create_model, set_fused_attention
from fer_bench.models.checkpoint import load_checkpoint, model_from_checkpoint, save_checkpoint
from fer_bench.runtime import (
    DistContext,
    agree,
    autocast_dtype,
    barrier,
    configure_backends,
    distributed_run,
    environment_facts,
    precision_note,
    resolve_device,
    rng_state,
    seed_everything,
    set_rng_state,
)
from fer_bench.train.checkpoints import BEST, LAST, check_best, clean_partial_writes, save_epoch_end
from fer_bench.train.data_setup import build_loaders, dataset_for_run, describe_heads, load_dataset, resolve_loader
from fer_bench.train.loop import EpochTally, train_steps, validate
from fer_bench.train.recipe import ExtraEval, Recipe, extra_eval_protocol, parse_interval, recipe_from_dict
from fer_bench.train.tracking import SplitInput, Tracker, flat_metrics, resume_tracker, split_input

log = logging.getLogger(__name__)

#: Recipe keys a resumed run takes from the command line; every other key is fixed when a run starts.
RESUMABLE_KEYS: tuple[str, ...] = (
    "name",
    "output_dir",
    "optim.epochs",
    "runtime.device",
    "runtime.workers",
    "runtime.threads",
    "runtime.max_minutes",
    "runtime.max_steps",
    "runtime.checkpoint_every",
    "runtime.log_every",
    "runtime.compile",
    "runtime.compile_backend",
    "runtime.fused_attention",
    "data.cache",
    "data.residency",
    "data.cache_images",
    "eval_after",
    "extra_evals",
    "tracking",
)
#: Written into the run folder as the very last step of a completed fit (see :func:`read_done`).
DONE = "done.json"
_TIMING_COLUMNS = ("seconds", "img_per_s")


class _DropMessage(logging.Filter):
    """Drops the records of one logger whose message starts with ``prefix``; the logger's other records pass."""

    def __init__(self, prefix: str) -> None:
        super().__init__()
        self.prefix = prefix

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(self.prefix)


# torch.compile on a CPU imports torch.utils.cpp_extension, which warns "No CUDA runtime is found, using
# CUDA_HOME=..." whenever an nvcc is on the PATH of a machine running CPU torch (or no GPU). Inductor's CPU code
# needs no CUDA, so the line only alarms; torch offers no argument to skip the check, hence this narrow filter.
_NO_CUDA_RUNTIME = _DropMessage("No CUDA runtime is found")


def quiet_cpu_compile() -> None:
    """Silence torch's "No CUDA runtime is found" warning before torch.compile of a model that runs on a CPU."""
    logger = logging.getLogger("torch.utils.cpp_extension")
    if _NO_CUDA_RUNTIME not in logger.filters:
        logger.addFilter(_NO_CUDA_RUNTIME)


@dataclass
class FitResult:
    output_dir: Path
    best_epoch: int
    best_val_acc: float
    epochs_run: int
    test_results: dict[str, Any] | None = None
    run_id: str | None = None
    summary: list[dict[str, float]] = field(default_factory=list)
    experiment_id: str | None = None


class Callbacks:
    """Hooks the CLI uses for progress bars and messages; the defaults log."""

    def message(self, text: str) -> None:
        log.info(text)

    def start_epoch(self, epoch: int, epochs: int, steps: int, done: int = 0) -> None:
        pass

    def step(self, loss: float | None) -> None:
        """After every step; ``loss`` every ``runtime.log_every`` steps (reading it waits for the device), else None."""

    def end_epoch(self, row: dict[str, float]) -> None:
        log.info("epoch %s: %s", row["epoch"], row)


class _Quiet(Callbacks):
    """Ranks other than 0 say nothing."""

    def end_epoch(self, row: dict[str, float]) -> None:
        pass


# ---------------------------------------------------------------------------------------------------------------------
# Small pieces


def warmup_cosine(step: int, *, warmup_steps: int, total_steps: int, min_ratio: float) -> float:
    """LR multiplier: linear warm-up from ~0 to 1 over ``warmup_steps``, then cosine down to ``min_ratio``.

    Example:
        >>> warmup_cosine(0, warmup_steps=10, total_steps=100, min_ratio=0.0)
        0.1
        >>> round(warmup_cosine(100, warmup_steps=10, total_steps=100, min_ratio=0.0), 6)
        0.0
    """
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def build_optimizer(
    model: FerModel, *, lr: float, weight_decay: float, layer_decay: float | None, fused: bool = False
) -> torch.optim.Optimizer:
    """AdamW via timm (no decay on norms/biases/position embeddings; optional layer-wise lr decay, with timm's
    parameter groups), as torch's fused single-kernel AdamW when ``fused`` and the device supports it."""
    from timm.optim import create_optimizer_v2

    kwargs = {"fused": True} if fused else {}
    try:
        return create_optimizer_v2(
            model, opt="adamw", lr=lr, weight_decay=weight_decay, layer_decay=layer_decay, **kwargs
        )
    except (RuntimeError, ValueError, TypeError):  # no fused kernel for these parameters' device or dtype
        return create_optimizer_v2(model, opt="adamw", lr=lr, weight_decay=weight_decay, layer_decay=layer_decay)


def _summary_csv(rows: list[dict[str, float]]) -> str:
    buffer = io.StringIO()
    if rows:
        names = list(dict.fromkeys(k for row in rows for k in row))
        writer = csv.DictWriter(buffer, fieldnames=names)
        writer.writeheader()
        writer.writerows(rows)
    return buffer.getvalue()


def _flatten(prefix: str, value: Any, out: dict[str, Any]) -> None:
    if isinstance(value, dict):
        for k, v in value.items():
            _flatten(f"{prefix}.{k}" if prefix else str(k), v, out)
    else:
        out[prefix] = value


def resume_differences(saved: dict[str, Any], given: dict[str, Any]) -> list[tuple[str, Any, Any]]:
    """(key, saved value, given value) for every recipe key the resumed run cannot honour (:data:`RESUMABLE_KEYS`
    aside): a resumed run keeps the data, model and optimiser it started with."""
    flat_saved: dict[str, Any] = {}
    flat_given: dict[str, Any] = {}
    _flatten("", saved, flat_saved)
    _flatten("", given, flat_given)
    out = []
    for key in sorted(set(flat_saved) | set(flat_given)):
        if any(key == k or key.startswith(k + ".") for k in RESUMABLE_KEYS):
            continue
        if flat_saved.get(key) != flat_given.get(key):
            out.append((key, flat_saved.get(key), flat_given.get(key)))
    return out


class CheckpointPolicy:
    """When to write a mid-epoch ``last.pt``: every N optimiser steps or M minutes (``runtime.checkpoint_every``).

    In a distributed run every rank must agree (writing one gathers the ranks' training sums), so the minute clock is
    rank 0's, shared at the log steps.
    """

    def __init__(self, setting: int | str | None, *, ctx: DistContext, log_every: int) -> None:
        self.kind, self.amount = parse_interval(setting) if setting is not None else ("never", 0)
        self.ctx, self.log_every = ctx, log_every
        self.last = time.monotonic()

    def due(self, global_step: int) -> bool:
        if self.kind == "steps":
            return global_step % int(self.amount) == 0
        if self.kind != "minutes":
            return False
        if self.ctx.distributed and global_step % self.log_every:
            return False
        return agree(self.ctx, time.monotonic() - self.last >= self.amount * 60)

    def saved(self) -> None:
        self.last = time.monotonic()


# ---------------------------------------------------------------------------------------------------------------------
# fit


def fit(
    recipe: Recipe, *, resume: bool = False, callbacks: Callbacks | None = None, recipe_path: Path | None = None
) -> FitResult:
    """Train ``recipe``; write checkpoints, ``recipe.resolved.yaml`` and ``summary.csv`` into its output folder, then
    evaluate the best checkpoint on the test split.

    Under ``torchrun`` (WORLD_SIZE > 1) each process trains its strided share of every global batch
    (``optim.batch_size`` is the global batch), validation is gathered across ranks, and only rank 0 writes.

    Args:
        recipe: A validated recipe (``load_recipe``).
        resume: Continue from ``<output_dir>/last.pt``, at the exact step it was written; the run ends with the same
            summary rows and test metrics as an uninterrupted one (on a CPU).
        callbacks: Progress and message hooks.
        recipe_path: The recipe file, logged to MLflow next to the resolved recipe.
    """
    with distributed_run(recipe.runtime.device) as ctx:
        cb = (callbacks or Callbacks()) if ctx.is_main else _Quiet()
        return _Run(recipe, ctx=ctx, cb=cb, resume=resume, recipe_path=recipe_path).run()


class _Run:
    """One call of :func:`fit`: its state lives here so each phase is a short method."""

    def __init__(self, recipe: Recipe, *, ctx: DistContext, cb: Callbacks, resume: bool, recipe_path: Path | None):
        self.recipe, self.ctx, self.cb, self.resume, self.recipe_path = recipe, ctx, cb, resume, recipe_path
        self.state: dict[str, Any] | None = None

    # -- build -------------------------------------------------------------------------------------------------------

    def run(self) -> FitResult:
        self.tracker: Tracker | None = None
        self._lock, self._created = None, False
        self.evals_written: list[str] = []
        try:
            self.resolve_output()
            self.setup_runtime()
            self.setup_data()
            self.setup_model()
            self.restore()
            self.setup_tracking()
            status = "FAILED"
            try:
                self.loop()
                test_results = self.evaluate_best()
                barrier(self.ctx)  # no rank leaves (and tears the group down) while rank 0 still evaluates
                status = "FINISHED"
            finally:
                if self.tracker is not None:
                    self.tracker.end(status)
            self._write_done()
        except BaseException:
            self._remove_if_empty()
            raise
        finally:
            if self._lock is not None:
                self._lock.close()  # releases the flock (a killed process releases it too)
        return FitResult(
            self.out,
            self.best["epoch"],
            self.best["val_acc"],
            self.epochs_run,
            test_results,
            self.run_id,
            self.summary,
            self.tracker.experiment_id if self.tracker is not None else None,
        )

    def _write_done(self) -> None:
        """``done.json``: the run finished, with its evaluations; written last, so its presence means complete."""
        if not self.ctx.is_main:
            return
        import datetime as dt

        step = self.best.get("global_step")
        done = {
            "run_id": self.tracker.run_id if self.tracker is not None else self.run_id,
            "finished": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            "evals": list(self.evals_written),
            "best_step": int(step) if step is not None else None,
        }
        atomic_write_text(self.out / DONE, json.dumps(done, indent=2) + "\n")

    def _take_folder(self) -> None:
        """Create the run folder and hold an exclusive lock on it for the run's lifetime: a second training into the
        same folder stops at once instead of interleaving its checkpoints with this one's."""
        self._created = not self.out.exists()
        self.out.mkdir(parents=True, exist_ok=True)
        handle = open(self.out / ".run.lock", "a+")  # noqa: SIM115 (held open until the run ends)
        try:
            import fcntl

            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except ImportError:  # no fcntl (Windows): no lock
            pass
        except OSError:
            handle.close()
            raise ConfigError(
                f"output_dir {self.out}: another training is writing there now; wait for it, or --set output_dir=..."
            ) from None
        self._lock = handle

    def _remove_if_empty(self) -> None:
        """A run that failed before writing anything leaves no empty folder behind."""
        if not (self.ctx.is_main and self._created and self.out.is_dir()):
            return
        if all(p.name == ".run.lock" for p in self.out.iterdir()):
            if self._lock is not None:
                self._lock.close()
                self._lock = None
            shutil.rmtree(self.out, ignore_errors=True)

    def resolve_output(self) -> None:
        out = str(self.recipe.resolved_output_dir())
        if self.ctx.distributed:  # {time} must name the same folder on every rank
            import torch.distributed as dist

            shared = [out]
            dist.broadcast_object_list(shared, src=0)
            out = shared[0]
        self.out = Path(out)
        if self.ctx.is_main:
            self._take_folder()
        last = self.out / LAST
        if self.resume:
            if not last.is_file():
                raise ConfigError(
                    f"--resume: {last} not found; pass --set output_dir=<the run folder> (output_dir "
                    f"{self.recipe.output_dir!r} names {self.out})"
                )
            self.state = load_checkpoint(last)
            self.recipe = self._resumed_recipe(self.state["recipe"])
        elif last.exists():
            raise ConfigError(
                f"output_dir {self.out}: holds a checkpoint from an earlier run; pass --resume to continue it, or "
                f"--set output_dir=... to start a new one"
            )
        if self.ctx.is_main:
            # a run in progress has no done.json: one left by an earlier completion goes before anything else
            (self.out / DONE).unlink(missing_ok=True)
            for path in clean_partial_writes(self.out):
                self.cb.message(f"removed {path.name}, left by a write that was interrupted")
            if self.state is not None:
                check_best(self.out, self.state, self.cb.message)
        barrier(self.ctx)

    def _resumed_recipe(self, saved: dict[str, Any]) -> Recipe:
        given = self.recipe.model_dump(mode="json")
        for key, before, now in resume_differences(saved, given):
            self.cb.message(
                f"--resume: {key}={now!r} is ignored: the run continues with {before!r} (data, model and optimiser "
                "settings are fixed when a run starts; start a new run to change them)"
            )
        if saved.get("optim", {}).get("epochs") != self.recipe.optim.epochs:
            self.cb.message(
                f"--resume: extending to {self.recipe.optim.epochs} epochs (was {saved['optim']['epochs']})"
            )
        merged = json.loads(json.dumps(saved))
        for key in RESUMABLE_KEYS:  # operational settings come from the command line
            *sections, last = key.split(".")
            source, target = given, merged
            for section in sections:
                source, target = source[section], target.setdefault(section, {})
            target[last] = source[last]
        merged["output_dir"] = str(self.out)
        return recipe_from_dict(merged)

    def setup_runtime(self) -> None:
        rt = self.recipe.runtime
        if rt.threads:
            torch.set_num_threads(rt.threads)
        seed_everything(rt.seed)
        self.device = resolve_device(rt.device, local_rank=self.ctx.local_rank if self.ctx.distributed else None)
        configure_backends(self.device)
        self.amp_dtype = autocast_dtype(rt.precision, self.device)
        note = precision_note(rt.precision, self.device, self.amp_dtype)
        if note:
            self.cb.message(note)
        self.memory_format = torch.channels_last if rt.channels_last else torch.contiguous_format

    def setup_data(self) -> None:
        data = self.recipe.data
        for turn in ("main", "others"):  # rank 0 first: it generates SynthFER and builds the cache the others reuse
            if (turn == "main") == self.ctx.is_main:
                self.info = dataset_for_run(
                    dataset=data.dataset,
                    root=data.root,
                    options=data.options,
                    synth=data.synth,
                    cache=data.cache,
                    cache_size=data.cache_size,
                    img_size=data.img_size,
                    val_split=data.val_split,
                    val_fraction=data.val_fraction,
                    seed=self.recipe.runtime.seed,
                    label_space=data.label_space,
                    message=self.cb.message,
                    align=data.align.model_dump() if data.align else None,
                    device=self.device,
                )
            barrier(self.ctx)
        self.face_framing = face_framing(self.info)
        # the versioned protocol the test split is scored under: the same name eval and compare use
        self.protocol = protocol_of(self.info, data.options, split=data.test_split)
        self.loader_kind = resolve_loader(data.loader, cached=data.cache != "off")
        started_with = (self.state or {}).get("loader")
        if started_with and started_with != self.loader_kind:
            raise ConfigError(
                f"--resume: the run trained with the {started_with} loader, which draws different augmentations than "
                f"the {self.loader_kind} one; resume with data.cache set as it was (the {started_with} loader)"
            )
        if self.info.target_kind != "label":
            self.cb.message(f"{self.info.name}: training on soft targets ({self.info.target_kind}); {self.info.splits}")

    def setup_model(self) -> None:
        recipe, rt, data = self.recipe, self.recipe.runtime, self.recipe.data
        self.label_names = self.info.label_space.names
        backbone_kwargs = dict(recipe.model.backbone_kwargs)
        if recipe.model.drop_path_rate:
            backbone_kwargs["drop_path_rate"] = recipe.model.drop_path_rate
        model = create_model(
            recipe.model.backbone,
            num_classes=len(self.label_names),
            img_size=data.img_size,
            pretrained=recipe.model.pretrained,
            heads=recipe.model.heads,
            stem=recipe.model.stem,
            **backbone_kwargs,
        )
        fused = rt.fused_attention if isinstance(rt.fused_attention, bool) else self.device.type == "cuda"
        set_fused_attention(model, fused)
        if self.ctx.distributed and self.device.type == "cuda":
            # a conv stem's BatchNorm normalises over the global batch, as in one process (NCCL only)
            model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
        self.model = model.to(self.device).to(memory_format=self.memory_format)
        self.model_config = {
            "backbone": recipe.model.backbone,
            "stem": recipe.model.stem,
            "num_classes": len(self.label_names),
            "img_size": data.img_size,
            "backbone_kwargs": {k: v for k, v in backbone_kwargs.items() if k != "drop_path_rate"},
            "heads": recipe.model.heads,
        }
        workers = rt.workers
        if workers == "auto":
            workers = 0 if self.device.type == "cpu" else 8
        self.workers = workers
        self.data = build_loaders(
            self.info,
            self.model,
            loader=self.loader_kind,
            residency=data.residency,
            train_split=data.train_split,
            val_split=data.val_split,
            img_size=data.img_size,
            global_batch=recipe.optim.batch_size,
            augment=data.augment,
            sampler=data.sampler,
            seed=rt.seed,
            workers=workers,
            cache_images=data.cache_images,
            ctx=self.ctx,
            device=self.device,
        )
        self.class_weights = None
        anchors = self.model.head("anchors")
        if anchors is not None and anchors.class_weighted:
            counts = torch.bincount(torch.as_tensor(self.data.train_labels), minlength=len(self.label_names))
            anchors.set_class_weights(counts)
            self.class_weights = anchors.class_weights
        self.heads_text = describe_heads(self.model, self.data.map_sources) if self.model.heads else ""
        if self.heads_text:
            self.cb.message(f"heads: {self.heads_text}")
        optim = recipe.optim
        self.optimizer = build_optimizer(
            self.model,
            lr=optim.lr,
            weight_decay=optim.weight_decay,
            layer_decay=optim.layer_decay,
            fused=self.device.type in ("cuda", "cpu"),
        )
        self.steps_per_epoch = len(self.data.train)
        if self.steps_per_epoch == 0:
            raise ConfigError(
                f"optim.batch_size={optim.batch_size}: larger than the {len(self.data.train_labels)} training images; "
                "an epoch would have no step"
            )
        self.total_steps = self.steps_per_epoch * optim.epochs
        warmup_steps = round(optim.warmup_epochs * self.steps_per_epoch)
        total = self.total_steps
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer,
            lambda step: warmup_cosine(
                step, warmup_steps=warmup_steps, total_steps=total, min_ratio=optim.min_lr_ratio
            ),
        )
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.amp_dtype == torch.float16)
        self.ema = None
        if optim.ema_decay:
            from timm.utils import ModelEmaV3

            self.ema = ModelEmaV3(self.model, decay=optim.ema_decay)

    def restore(self) -> None:
        """Put the model, optimiser, schedule and position back as ``last.pt`` recorded them; then compile and wrap."""
        self.position = {"epoch": 0, "step": 0}
        self.best = {"epoch": -1, "global_step": None, "val_acc": -1.0}
        self.summary: list[dict[str, float]] = []
        self.partial: dict[str, Any] | None = None
        self.run_id = None
        self.epochs_run = 0
        if self.state is not None:
            state = self.state
            self.model.load_state_dict(state["model"])
            self.optimizer.load_state_dict(state["optimizer"])
            self.scheduler.load_state_dict(state["scheduler"])
            if state.get("scaler") and self.scaler.is_enabled():  # empty when the run had no fp16 scaler
                self.scaler.load_state_dict(state["scaler"])
            if self.ema is not None:
                self.ema.module.load_state_dict(state["ema"] if state.get("ema") is not None else state["model"])
            set_rng_state(state["rng"])
            self.position = dict(state.get("position") or {"epoch": int(state["epoch"]) + 1, "step": 0})
            self.best = dict(
                state.get("best")
                or {"epoch": int(state["best_epoch"]), "global_step": None, "val_acc": float(state["best_val_acc"])}
            )
            self.summary = list(state["summary"])
            # the epoch's partial sums (and the heads' per-rank sums) were gathered over all ranks when saved:
            # rank 0 resumes with them, the others from zero, so the next all-reduce counts them once
            self.partial = state.get("partial") if self.ctx.is_main else None
            if not self.ctx.is_main:
                self.model.zero_rank_local_sums()
            self.run_id = state.get("mlflow_run_id")
            where = f"epoch {self.position['epoch'] + 1}, step {self.position['step']}"
            self.cb.message(f"resumed from {self.out / LAST} at {where} (global step {self.scheduler.last_epoch})")
            self.state = None  # the weights now live in the model; free the copy
        self.compile_seconds = None
        self.forward_model: torch.nn.Module = self.model
        if self.recipe.runtime.compile:
            if self.device.type != "cuda":
                quiet_cpu_compile()
            # in place: state_dict keys stay as they are; before DDP, as timm and nanoGPT do
            self.model.compile(backend=self.recipe.runtime.compile_backend)
        if self.ctx.distributed:
            from torch.nn.parallel import DistributedDataParallel as DDP

            unused = self.model.has_unused_parameters()
            # ViT/Swin have no BatchNorm and Swin's index buffers never change: nothing to broadcast. A conv stem's
            # BatchNorm is SyncBatchNorm on GPUs; on CPUs (no SyncBatchNorm) rank 0's running statistics are
            # broadcast each step, while batch statistics stay per process.
            has_bn = any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in self.model.modules())
            broadcast = has_bn and self.device.type != "cuda"
            if broadcast:
                self.cb.message(
                    "DDP on CPUs: the conv stem's BatchNorm normalises each process's share of the batch "
                    "(SyncBatchNorm needs CUDA); running statistics follow rank 0"
                )
            self.forward_model = DDP(
                self.model,
                device_ids=[self.device.index] if self.device.type == "cuda" else None,
                broadcast_buffers=broadcast,
                gradient_as_bucket_view=True,
                find_unused_parameters=unused,
                static_graph=not unused,
            )

    def setup_tracking(self) -> None:
        recipe, info = self.recipe, self.info
        self.recipe_dict = recipe.model_dump(mode="json")
        self.recipe_dict["output_dir"] = str(self.out)  # the concrete folder, with {name}/{time} filled in
        env = environment_facts(self.device)
        run_facts = {
            "loader": self.data.loader,
            "residency": self.data.residency,
            "cache": str(info.extras.get("cache", "off")),
            "world_size": str(self.ctx.world_size),
            "precision": str(self.amp_dtype or "fp32").replace("torch.", ""),
            "compile": str(recipe.runtime.compile),
        }
        self.tracker: Tracker | None = None
        if not self.ctx.is_main:
            return
        self.cb.message(
            f"data: {self.data.loader} loader"
            + (f", cache {run_facts['cache']} ({self.data.residency})" if self.data.loader == "device" else "")
            + f"; {self.ctx.world_size} process(es), global batch {recipe.optim.batch_size}"
        )
        resolved = {
            **self.recipe_dict,
            "_resolved": {
                **env,
                **run_facts,
                "label_space": list(self.label_names),
                "layout": info.layout,
                "splits": info.splits,
                "protocol": f"{self.protocol.name} v{self.protocol.version}",
                "face_framing": self.face_framing,
            },
        }
        atomic_write_text(self.out / "recipe.resolved.yaml", yaml.safe_dump(resolved, sort_keys=False))
        trk = recipe.tracking
        if self.run_id:
            self.tracker = resume_tracker(tracking_uri=trk.tracking_uri, run_id=self.run_id, warn=self.cb.message)
            self.tracker.set_tags(trk.tags)
            self._log_missing_epochs()
        else:
            self.tracker = Tracker(
                enabled=trk.enabled,
                tracking_uri=trk.tracking_uri,
                experiment=trk.experiment,
                run_name=trk.run_name or recipe.name,
                warn=self.cb.message,
                parent_run_id=trk.parent_run_id,
                tags=trk.tags,
            )
            self.tracker.log_params(self.recipe_dict)
            self.tracker.set_tags(
                {
                    "kind": "train",
                    "dataset": info.name,
                    "layout": info.layout,
                    "protocol": self.protocol.name,
                    "protocol_version": str(self.protocol.version),
                    "alignment": (self.face_framing or {}).get("alignment") or "dataset crops",
                    "backbone": recipe.model.backbone,
                    "heads": self.heads_text or "none",
                    **env,
                    **run_facts,
                }
            )
            self.tracker.log_inputs(self._split_inputs())
            self.tracker.log_artifact(self.out / "recipe.resolved.yaml", "recipe")
            if self.recipe_path is not None:
                self.tracker.log_artifact(self.recipe_path, "recipe")
        self.run_id = self.tracker.run_id

    def _split_inputs(self) -> list[SplitInput]:
        """The splits this run uses (train, val, and test when the best checkpoint is evaluated), as MLflow inputs.

        The test rows are the protocol's (its subset, if any), hashed as the evaluator hashes them. A split that
        cannot be described is left out with one message: tracking extras never stop a training.
        """
        if not self.tracker.active:
            return []
        data = self.recipe.data
        splits = {"train": data.train_split, "val": data.val_split}
        if self.recipe.eval_after:
            splits["test"] = data.test_split
        inputs = []
        for context, split in splits.items():
            try:
                rows = protocol_rows(self.protocol, self.info) if context == "test" else self.info.split(split)
                inputs.append(split_input(name=self.protocol.name, context=context, rows=rows, source=self.info.root))
            except Exception as exc:
                self.cb.message(f"MLflow: the {context} split ({split!r}) is not recorded as a dataset input ({exc})")
        return inputs

    def _log_missing_epochs(self) -> None:
        """Epoch rows the checkpoint holds but MLflow missed (the run was killed between the two writes)."""
        logged = self.tracker.logged_steps("val_acc")
        for row in self.summary:
            if int(row["epoch"]) not in logged:
                self.tracker.log_metrics({k: v for k, v in row.items() if k != "epoch"}, step=int(row["epoch"]))

    # -- loop --------------------------------------------------------------------------------------------------------

    def _model_state(self) -> dict[str, Any]:
        """The model's state dict with per-rank sums (the anchors' warm-up class means) summed over all ranks; a
        collective under DDP, so every rank calls it."""
        state = self.model.state_dict()
        local = self.model.rank_local_sums()
        if self.ctx.distributed and local:
            import torch.distributed as dist

            for name in local:
                total = state[name].detach().clone()
                dist.all_reduce(total)
                state[name] = total
        return state

    def _checkpoint_state(
        self, *, epoch_done: int, position: dict[str, int], partial: dict | None, model_state: dict
    ) -> dict[str, Any]:
        return {
            "model": model_state,
            "ema": self.ema.module.state_dict() if self.ema is not None else None,
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "rng": rng_state(),
            "epoch": epoch_done,
            "position": position,
            "global_step": self.scheduler.last_epoch,
            "partial": partial,
            "best": dict(self.best),
            "best_val_acc": self.best["val_acc"],
            "best_epoch": self.best["epoch"],
            "summary": self.summary,
            "recipe": self.recipe_dict,
            "model_config": self.model_config,
            "label_names": list(self.label_names),
            "face_framing": self.face_framing,
            "dataset": self.info.name,
            "mlflow_run_id": self.run_id,
            "world_size": self.ctx.world_size,
            "loader": self.loader_kind,
            "fer_bench_version": __version__,
        }

    def _finished(self, epoch: int) -> bool:
        max_steps = self.recipe.runtime.max_steps
        return epoch >= self.recipe.optim.epochs or bool(max_steps and self.scheduler.last_epoch >= max_steps)

    def loop(self) -> None:
        rt, optim = self.recipe.runtime, self.recipe.optim
        policy = CheckpointPolicy(rt.checkpoint_every, ctx=self.ctx, log_every=rt.log_every)
        epoch = self.position["epoch"]
        while not self._finished(epoch):
            start_step = self.position["step"] if epoch == self.position["epoch"] else 0
            # a row of this epoch was written by a run stopped at runtime.max_steps inside it: the epoch goes on now
            self.summary = [r for r in self.summary if int(r["epoch"]) < epoch]
            tally = EpochTally.from_state(self.partial if start_step else None, self.device)
            self.partial = None
            loader = self.data.train
            loader.set_epoch(epoch)
            self.cb.start_epoch(epoch, optim.epochs, self.steps_per_epoch, start_step)
            started = time.perf_counter()
            self._compile_t0 = started
            seconds_before = tally.seconds

            def after_step(steps_done: int, epoch: int = epoch, tally: EpochTally = tally) -> None:
                if self.compile_seconds is None and rt.compile:
                    self._record_compile_time()
                if steps_done >= self.steps_per_epoch or not policy.due(self.scheduler.last_epoch):
                    return
                if rt.max_steps and self.scheduler.last_epoch >= rt.max_steps:
                    return  # the epoch end right after writes the checkpoint
                partial = tally.gathered(self.ctx).state()
                model_state = self._model_state()
                if self.ctx.is_main:
                    state = self._checkpoint_state(
                        epoch_done=epoch - 1,
                        position={"epoch": epoch, "step": steps_done},
                        partial=partial,
                        model_state=model_state,
                    )
                    save_checkpoint(self.out / LAST, state)
                policy.saved()

            train_steps(
                self.model,
                loader,
                forward_model=self.forward_model,
                start_step=start_step,
                tally=tally,
                optimizer=self.optimizer,
                scheduler=self.scheduler,
                scaler=self.scaler,
                device=self.device,
                amp_dtype=self.amp_dtype,
                label_smoothing=optim.label_smoothing,
                grad_clip=optim.grad_clip,
                target_kind=self.info.target_kind,
                class_weights=self.class_weights,
                seed=rt.seed,
                rank=self.ctx.rank,
                total_steps=self.total_steps,
                max_steps=rt.max_steps,
                log_every=rt.log_every,
                step_done=self.cb.step,
                after_step=after_step,
                memory_format=self.memory_format,
                ema=self.ema,
            )
            row: dict[str, float] = {"epoch": epoch}
            row |= tally.row(self.ctx)
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            train_seconds = seconds_before + time.perf_counter() - started
            row |= validate(
                self.ema.module if self.ema is not None else self.model,
                self.data.val,
                device=self.device,
                amp_dtype=self.amp_dtype,
                num_classes=len(self.label_names),
                memory_format=self.memory_format,
            )
            row["lr"] = self.optimizer.param_groups[0]["lr"]
            row["seconds"] = round(seconds_before + time.perf_counter() - started, 2)
            row["img_per_s"] = round(tally.count * self.ctx.world_size / max(train_seconds, 1e-9), 1)
            self.summary.append(row)
            self.epochs_run += 1
            improved = row["val_acc"] > self.best["val_acc"]
            if improved:
                self.best = {"epoch": epoch, "global_step": self.scheduler.last_epoch, "val_acc": row["val_acc"]}
            # runtime.max_steps can end an epoch early: the position then stays inside it, with its sums, so a
            # resume with more steps finishes that epoch (and replaces this row) instead of skipping its remainder
            steps_done = self.scheduler.last_epoch - epoch * self.steps_per_epoch  # the same on every rank
            ended = steps_done >= self.steps_per_epoch
            position = {"epoch": epoch + 1, "step": 0} if ended else {"epoch": epoch, "step": steps_done}
            partial = None if ended else tally.gathered(self.ctx).state()
            model_state = self._model_state()
            if self.ctx.is_main:
                state = self._checkpoint_state(
                    epoch_done=epoch if ended else epoch - 1,
                    position=position,
                    partial=partial,
                    model_state=model_state,
                )
                save_epoch_end(self.out, state, improved=improved)
                atomic_write_text(self.out / "summary.csv", _summary_csv(self.summary))
                self.tracker.log_metrics({k: v for k, v in row.items() if k != "epoch"}, step=epoch)
            policy.saved()
            self.cb.end_epoch(row)
            epoch += 1
            if rt.max_minutes and agree(self.ctx, sum(r["seconds"] for r in self.summary) > rt.max_minutes * 60):
                self.cb.message(f"runtime.max_minutes={rt.max_minutes} reached after epoch {epoch}; stopping")
                break
            if rt.max_steps and self.scheduler.last_epoch >= rt.max_steps:
                self.cb.message(f"runtime.max_steps={rt.max_steps} reached in epoch {epoch}; stopping")
                break
        if self.ctx.is_main:
            atomic_write_text(self.out / "summary.csv", _summary_csv(self.summary))

    def _record_compile_time(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.compile_seconds = round(time.perf_counter() - self._compile_t0, 1)
        self.cb.message(f"runtime.compile: the first step took {self.compile_seconds} s (compilation included)")
        if self.tracker is not None:
            self.tracker.log_metrics({"compile_seconds": self.compile_seconds})

    # -- evaluate ----------------------------------------------------------------------------------------------------

    def evaluate_best(self) -> dict[str, Any] | None:
        """Rank 0: the best checkpoint on the test split (``eval/``) and on every extra evaluation (``eval-<name>/``),
        each logged as an evaluation child run; a report already written for the same best step is reused."""
        if not self.ctx.is_main:
            return None
        best_path = self.out / BEST
        tracker = self.tracker
        test_results = None
        if self.recipe.eval_after and best_path.exists():
            check_best(self.out, load_checkpoint(self.out / LAST), self.cb.message)
            best_state = load_checkpoint(best_path)
            step = best_state.get("global_step")
            models: list[FerModel] = []

            def model() -> FerModel:  # built once, on the first evaluation that runs
                if not models:
                    models.append(model_from_checkpoint(best_state).to(self.device))
                return models[0]

            data = self.recipe.data
            test_results = self._reuse(self.out / "eval", step)
            if test_results is None:
                test_results = evaluate(
                    model(),
                    self.info,
                    protocol=self.protocol,
                    img_size=data.img_size,
                    label_names=self.label_names,
                    device=self.device,
                    workers=self.workers,
                )
                test_results["checkpoint"] = str(best_path)
                test_results["checkpoint_step"] = step
                write_report(test_results, self.out / "eval")
            self.evals_written.append("eval")
            prefix = self.recipe.data.test_split
            # logged at the best weights' step: a resumed, finished run finds them there and does not log them again
            logged_step = int(test_results.get("checkpoint_step") or 0)
            if logged_step not in tracker.logged_steps(f"{prefix}/acc"):
                metrics = flat_metrics(test_results, prefix=prefix)
                tracker.log_metrics(metrics, step=logged_step)  # the headline figures on the training run's row too
                self._log_eval_run(
                    test_results,
                    metrics,
                    step=logged_step,
                    folder="eval",
                    protocol=self.protocol,
                    info=self.info,
                    run_name=f"eval-{self.protocol.name}",
                )
            for extra in self.recipe.extra_evals:
                self._extra_evaluation(extra, model=model, step=step, checkpoint=best_path)
        tracker.log_artifact(self.out / "summary.csv")
        tracker.log_artifact(best_path, "checkpoints")
        return test_results

    def _reuse(self, folder: Path, step: int | None) -> dict[str, Any] | None:
        """The results in ``folder`` when they are of the best checkpoint at ``step`` (a resume of a finished run)."""
        results_path = folder / "results.json"
        previous = _read_results(results_path)
        if previous is not None and step is not None and previous.get("checkpoint_step") == step:
            self.cb.message(f"the best checkpoint (step {step}) was evaluated already: {results_path}")
            return previous
        return None

    def _extra_data(self, extra: ExtraEval) -> tuple[Any, Any]:
        """(dataset, protocol) of an extra evaluation. The training data itself (its cache included) when the item
        names no other dataset, root, options or SynthFER copy; else read from its root, a SynthFER copy generated
        there first when missing (as ``data.synth`` does for training)."""
        data = self.recipe.data
        if extra.dataset is None and extra.root is None and not extra.options and extra.synth is None:
            protocol, _ = extra_eval_protocol(extra, data, self.info)
            return self.info, protocol
        protocol, options = extra_eval_protocol(extra, data)
        info = load_dataset(
            dataset=protocol.dataset,
            root=extra.root or data.root,
            options={**options, **protocol.options},
            synth=extra.synth,
            message=self.cb.message,
        )
        if extra.dataset is None:
            protocol, _ = extra_eval_protocol(extra, data, info)
        return info, protocol

    def _extra_evaluation(self, extra: ExtraEval, *, model, step: int | None, checkpoint: Path) -> None:
        """One item of ``extra_evals``: evaluated into ``eval-<name>/`` (unless done for this best step), its
        headline figures on the training run's row as ``eval-<name>/<metric>``, its report as a child run."""
        name = f"eval-{extra.name}"
        folder = self.out / name
        info = protocol = None
        results = self._reuse(folder, step)
        if results is None:
            info, protocol = self._extra_data(extra)
            from fer_bench.eval.face_predict import alignment_mismatch

            problem = alignment_mismatch(self.face_framing, info.extras.get("alignment"))
            if problem:
                self.cb.message(f"extra_evals {extra.name}: {problem}; evaluated anyway")
            self.cb.message(f"extra evaluation {extra.name}: {protocol.name} / {protocol.split}")
            results = evaluate(
                model(),
                info,
                protocol=protocol,
                img_size=self.recipe.data.img_size,
                label_names=self.label_names,
                device=self.device,
                workers=self.workers,
                perturb=extra.perturb,
                perturb_seed=0,  # every run of a study sees the same perturbed images
            )
            results["checkpoint"] = str(checkpoint)
            results["checkpoint_step"] = step
            results["eval_name"] = extra.name
            write_report(results, folder)
        self.evals_written.append(name)
        logged_step = int(results.get("checkpoint_step") or 0)
        if logged_step in self.tracker.logged_steps(f"{name}/acc"):
            return
        headline = {f"{name}/{k}": v for k, v in results["metrics"].items() if _finite(v)}
        self.tracker.log_metrics(headline, step=logged_step)
        self._log_eval_run(
            results,
            flat_metrics(results, prefix=extra.split),
            step=logged_step,
            folder=name,
            protocol=protocol,
            info=info,
            run_name=name,
            extra_tags={"eval_name": extra.name},
        )

    def _log_eval_run(
        self,
        results: dict[str, Any],
        metrics: dict[str, float],
        *,
        step: int,
        folder: str,
        protocol: Any,
        info: Any,
        run_name: str,
        extra_tags: dict[str, str] | None = None,
    ) -> None:
        """An evaluation as a child run of the training run: tagged as ``ferbench eval`` tags its runs (and with the
        recipe's ``tracking.tags``), with the scored rows as its dataset input (when ``info``, the data, was read), the
        metrics and the report files of ``folder`` (under that artifact path)."""
        recorded = results.get("protocol") or {}
        tags = {
            **self.recipe.tracking.tags,
            "kind": "eval",
            "dataset": results.get("dataset") or (info.name if info is not None else ""),
            "protocol": recorded.get("name") or (protocol.name if protocol is not None else ""),
            "protocol_version": str(recorded.get("version", protocol.version if protocol is not None else "")),
            "checkpoint": str(results.get("checkpoint") or ""),
            "train_run_id": self.run_id or "",
            "backbone": self.recipe.model.backbone,
            "eval_name": "eval",
            **(extra_tags or {}),
        }
        with self.tracker.child(run_name=run_name, tags=tags) as run:
            if info is not None and protocol is not None:
                try:
                    rows = protocol_rows(protocol, info)
                    run.log_inputs(
                        [
                            split_input(
                                name=protocol.name,
                                context="test",
                                rows=rows,
                                source=info.root,
                                dataset_hash=results["dataset_hash"],
                            )
                        ]
                    )
                except Exception as exc:
                    self.cb.message(f"MLflow: the scored rows are not recorded as {run_name}'s dataset input ({exc})")
            run.log_metrics(metrics, step=step)
            for path in sorted((self.out / folder).iterdir()):
                if path.is_file() and not path.name.startswith("."):
                    run.log_artifact(path, folder)


def _finite(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _read_results(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def read_done(folder: str | Path) -> dict[str, Any] | None:
    """The ``done.json`` of a run folder (``run_id``, ``finished``, ``evals``: the report folders, ``best_step``), or
    None when the run has not completed (still running, killed, failed) or the file is unreadable."""
    done = _read_results(Path(folder) / DONE)
    return done if isinstance(done, dict) and "evals" in done else None


def timing_free(rows: list[dict[str, float]]) -> list[dict[str, float]]:
    """Summary rows without the wall-clock columns (what a resumed run must reproduce exactly)."""
    return [{k: v for k, v in row.items() if k not in _TIMING_COLUMNS} for row in rows]
