"""Runtime: device, precision, seeding, RNG state and the distributed context.

One module for the trainer, the evaluator and the CLI, so every command picks the same device and precision the same
way. It imports torch and the standard library only.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import platform
import random
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from fer_bench import __version__
from fer_bench.errors import ConfigError

PRECISIONS: tuple[str, ...] = ("bf16", "fp16", "fp32")


# ---------------------------------------------------------------------------------------------------------------------
# Device and precision


def resolve_device(name: str = "auto", *, local_rank: int | None = None) -> torch.device:
    """The torch device for ``name`` (``auto``, ``cpu``, ``cuda``, ``cuda:N``, ``mps``).

    ``auto`` picks CUDA, then MPS, then the CPU. Under a distributed launch ``local_rank`` chooses the GPU of this
    process (``cuda`` becomes ``cuda:LOCAL_RANK``).

    Raises:
        ConfigError: ``cuda`` was asked for on a machine without a CUDA device.
    """
    if name == "auto":
        if torch.cuda.is_available():
            name = "cuda"
        elif getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            name = "mps"
        else:
            name = "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"runtime.device: {name!r} was asked for but no CUDA device is available")
    if name == "cuda" and local_rank is not None:
        # several processes may share a GPU (more ranks than devices): wrap around, as init_distributed does
        return torch.device("cuda", local_rank % torch.cuda.device_count())
    return torch.device(name)


def cpu_has_native_bf16() -> bool:
    """True when this CPU runs bf16 matrix work natively (AVX-512 BF16 or AMX); elsewhere bf16 is emulated.

    Read from the CPU flags on Linux (torch's capability string says AVX512 on every AVX-512 CPU, Skylake
    included, which has no bf16 instructions); elsewhere the capability string decides.
    """
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    return bool(flags & {"avx512_bf16", "amx_bf16"})
    except OSError:
        pass
    return torch.backends.cpu.get_cpu_capability() in ("AVX512_BF16", "AMX")


def autocast_dtype(precision: str, device: torch.device, *, force: bool = False) -> torch.dtype | None:
    """The autocast dtype for ``precision`` on ``device``, or None for plain fp32.

    bf16 runs on GPUs and on CPUs with native bf16; fp16 needs CUDA. ``force`` returns the dtype whatever the CPU
    (tests of precision-dependent code use it so they run the same path on every machine).

    Example:
        >>> autocast_dtype("fp32", torch.device("cpu")) is None, autocast_dtype("bf16", torch.device("cpu"), force=True)
        (True, torch.bfloat16)
    """
    if precision not in PRECISIONS:
        raise ConfigError(f"runtime.precision: expected one of {list(PRECISIONS)}, got {precision!r}")
    if precision == "fp32":
        return None
    if precision == "bf16" and (device.type == "cuda" or force or (device.type == "cpu" and cpu_has_native_bf16())):
        return torch.bfloat16
    if precision == "fp16" and (device.type == "cuda" or force):
        return torch.float16
    return None


def autocast(device: torch.device, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    """``torch.autocast`` for ``dtype`` on ``device``, or a no-op for fp32. Weights stay fp32 (master weights)."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def precision_note(precision: str, device: torch.device, dtype: torch.dtype | None) -> str | None:
    """A one-line explanation when ``precision`` was asked for but is not used on ``device``."""
    if precision == "fp32" or dtype is not None:
        return None
    reason = "this CPU has no native bf16 (AVX-512 BF16/AMX), where bf16 is slower than fp32"
    if precision == "fp16" or device.type != "cpu":
        reason = f"{precision} autocast needs CUDA; the device is {device.type}"
    return f"runtime.precision={precision}: autocast not used ({reason}); training in fp32"


def configure_backends(device: torch.device) -> None:
    """Fast defaults on GPUs (as timm's train.py): TF32 for the few fp32 matmuls left, cuDNN autotuning."""
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True


# ---------------------------------------------------------------------------------------------------------------------
# Seeds and RNG state


def derive_seed(*parts: int | str) -> int:
    """A 63-bit seed that is a pure function of ``parts`` (seed, epoch, step, rank, ...): the same on every machine.

    Example:
        >>> derive_seed(0, 1) == derive_seed(0, 1) != derive_seed(1, 0)
        True
    """
    digest = hashlib.blake2b("/".join(str(p) for p in parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (every device)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state() -> dict[str, Any]:
    """Every RNG's state (torch CPU and CUDA, NumPy, Python) as tensors and plain lists, for a weights-only save."""
    py = random.getstate()
    np_state = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "python": [py[0], list(py[1]), py[2]],
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]],
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore :func:`rng_state`'s output (missing parts are left as they are)."""
    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "numpy" in state:
        kind, keys, pos, has_gauss, cached = state["numpy"]
        np.random.set_state((kind, keys.numpy().astype(np.uint32), int(pos), int(has_gauss), float(cached)))
    if "cuda" in state and torch.cuda.is_available():
        with contextlib.suppress(RuntimeError, IndexError):  # a resume on fewer GPUs keeps their own states
            torch.cuda.set_rng_state_all(state["cuda"])


# ---------------------------------------------------------------------------------------------------------------------
# Distributed context


@dataclass(frozen=True)
class DistContext:
    """Where this process sits in a (possibly single-process) run.

    Attributes:
        rank: Global rank (0 in a single process).
        world_size: Number of processes.
        local_rank: Rank on this node (chooses the GPU).
        backend: ``nccl``, ``gloo`` or ``none``.
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: str = "none"

    @property
    def is_main(self) -> bool:
        """Only the main process writes checkpoints, summaries and MLflow."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def launched_by_torchrun() -> bool:
    """True inside a process started by ``torchrun`` (it sets WORLD_SIZE, RANK and LOCAL_RANK)."""
    return "WORLD_SIZE" in os.environ and "RANK" in os.environ


def init_distributed(device_name: str = "auto") -> DistContext:
    """Join the process group torchrun set up (NCCL on GPUs, gloo on CPUs); a single process gets the default context.

    Raises:
        ConfigError: a torchrun launch with more processes than GPUs, or an environment torchrun did not write.
    """
    if not launched_by_torchrun():
        return DistContext()
    try:
        world_size, rank = int(os.environ["WORLD_SIZE"]), int(os.environ["RANK"])
        local_rank = int(os.environ.get("LOCAL_RANK", rank))
    except ValueError as exc:
        raise ConfigError(f"torchrun environment: WORLD_SIZE/RANK/LOCAL_RANK must be integers ({exc})") from None
    if world_size == 1:
        return DistContext(local_rank=local_rank)
    import torch.distributed as dist

    use_cuda = device_name != "cpu" and torch.cuda.is_available()
    # FER_BENCH_DIST_BACKEND overrides the choice: gloo also carries CUDA tensors, e.g. when NCCL refuses two
    # ranks on one GPU (benchmarks/gpu_check.py's fallback)
    backend = os.environ.get("FER_BENCH_DIST_BACKEND") or ("nccl" if use_cuda else "gloo")
    if backend not in ("nccl", "gloo"):
        raise ConfigError(f"FER_BENCH_DIST_BACKEND: expected nccl or gloo, got {backend!r}")
    if use_cuda:
        # Several processes may share one GPU (the CI-style check of NCCL on a single card): wrap around.
        torch.cuda.set_device(local_rank % torch.cuda.device_count())
    if not dist.is_initialized():
        # rank 0 alone builds the cache of a large dataset and runs the test evaluation while the others wait in a
        # barrier: allow more than NCCL's default 10 minutes for that
        minutes = float(os.environ.get("FER_BENCH_DIST_TIMEOUT_MIN", "120"))
        import datetime

        dist.init_process_group(backend=backend, timeout=datetime.timedelta(minutes=minutes))
    return DistContext(rank=rank, world_size=world_size, local_rank=local_rank, backend=backend)


def shutdown_distributed() -> None:
    """Leave the process group, if one was joined."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def agree(ctx: DistContext, decision: bool) -> bool:
    """Rank 0's ``decision`` on every rank (a decision from a clock must be taken once, or the ranks diverge)."""
    if not ctx.distributed:
        return decision
    import torch.distributed as dist

    shared = [bool(decision)]
    dist.broadcast_object_list(shared, src=0)
    return bool(shared[0])


def barrier(ctx: DistContext) -> None:
    """Wait for every rank (no-op in a single process)."""
    if ctx.distributed:
        import torch.distributed as dist

        dist.barrier()


def torchrun_command(nproc: int, args: list[str]) -> list[str]:
    """The command that runs ``ferbench <args>`` as ``nproc`` processes on this machine with torchrun
    (``--standalone``: a local rendezvous on a free port).

    Example:
        >>> torchrun_command(2, ["train", "r.yaml"])[2:]
        ['torch.distributed.run', '--standalone', '--nproc-per-node', '2', '-m', 'fer_bench', 'train', 'r.yaml']
    """
    import sys

    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc)] + [
        "-m",
        "fer_bench",
        *args,
    ]


@contextlib.contextmanager
def distributed_run(device_name: str = "auto") -> Iterator[DistContext]:
    """``init_distributed`` on entry and ``shutdown_distributed`` on exit, also after an error."""
    ctx = init_distributed(device_name)
    try:
        yield ctx
    finally:
        if ctx.distributed:
            shutdown_distributed()


def global_mean(total: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
    """``total / count`` where both are sums over this process's samples, as the mean over every process's samples.

    In a DDP run each rank's share is scaled so that DDP's average of the ranks' gradients is the gradient of the
    global mean: a loss normalised by a data-dependent count (samples with an AU map, masked pixels, class weights)
    then trains exactly as in one process with the same global batch. The count's all-reduce is a collective, not a
    host sync. In one process: ``total / max(count, 1)``.

    Example:
        >>> float(global_mean(torch.tensor(6.0), torch.tensor(3.0)))
        2.0
    """
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        everywhere = count.detach().to(total.dtype).clone()
        dist.all_reduce(everywhere)
        return total * dist.get_world_size() / everywhere.clamp_min(1.0)
    return total / count.to(total.dtype).clamp_min(1.0)


# ---------------------------------------------------------------------------------------------------------------------
# Environment facts


def environment_facts(device: torch.device) -> dict[str, str]:
    """Versions and machine facts recorded with every run and result."""
    import timm

    from fer_bench.provenance import git_sha

    facts = {
        "fer_bench": __version__,
        "python": platform.python_version(),
        "torch": str(torch.__version__),
        "timm": timm.__version__,
        "device": str(device) + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else ""),
        "threads": str(torch.get_num_threads()),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "platform": platform.platform(),
        "git_sha": git_sha(),
    }
    with contextlib.suppress(ImportError):
        import albumentations

        facts["albumentations"] = albumentations.__version__
    return facts
