"""Where the toolkit runs: device and dtype names, free memory, mixed precision, and the
environment report that ``ctsft env`` prints for bug reports."""

from __future__ import annotations

import contextlib
import os
import time
from typing import Any, Iterator

import torch

from ctsft_lens.errors import CtsftError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
"""``--dtype`` names and what they load the weights as."""
DEVICE_HELP = "auto (CUDA if available, else CPU), cpu, cuda, cuda:N or mps"


def resolve_device(spec: str | None) -> str:
    """``auto`` -> ``cuda`` when CUDA is visible, else ``cpu``; other names are checked to exist."""
    spec = (spec or "auto").strip().lower()
    if spec == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if spec == "cpu":
        return "cpu"
    if spec == "mps":
        if not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
            raise CtsftError("--device mps: no Apple MPS device is available here; use --device cpu or auto")
        return "mps"
    if spec == "cuda" or spec.startswith("cuda:"):
        if not torch.cuda.is_available():
            raise CtsftError(f"--device {spec}: no CUDA device is visible (torch {torch.__version__}); "
                             "use --device cpu or auto")
        if ":" in spec:
            index = spec.split(":", 1)[1]
            if not index.isdigit() or int(index) >= torch.cuda.device_count():
                raise CtsftError(f"--device {spec}: this machine has {torch.cuda.device_count()} CUDA device(s) "
                                 f"(cuda:0..cuda:{torch.cuda.device_count() - 1})")
        return spec
    raise CtsftError(f"unknown device {spec!r}; use {DEVICE_HELP}")


def resolve_dtype(name: str | torch.dtype | None) -> torch.dtype:
    """``float32`` / ``bfloat16`` / ``float16`` (or a ``torch.dtype``) as a ``torch.dtype``."""
    if name is None:
        return torch.float32
    if isinstance(name, torch.dtype):
        if name not in DTYPES.values():
            raise CtsftError(f"dtype {name} is not supported; use one of {tuple(DTYPES)}")
        return name
    if name not in DTYPES:
        raise CtsftError(f"unknown dtype {name!r}; use one of {tuple(DTYPES)}")
    return DTYPES[name]


def free_memory_gb(device: str | torch.device) -> float | None:
    """Free memory of a CUDA device in GiB (``None`` elsewhere: the caller keeps its own budget)."""
    device = torch.device(device)
    if device.type != "cuda":
        return None
    free, _ = torch.cuda.mem_get_info(device)
    return free / 2**30


def memory_budget_gb(device: str | torch.device, given: float | None, *, default: float = 2.0,
                     share: float = 0.7) -> float:
    """The chunking budget: ``given`` if set, else ``share`` of the free CUDA memory, else ``default``."""
    if given is not None:
        if not given > 0:
            raise CtsftError(f"--memory-gb must be > 0, got {given}")
        return float(given)
    free = free_memory_gb(device)
    return default if free is None else max(0.25, share * free)


@contextlib.contextmanager
def autocast(amp: str, model: Any) -> Iterator[None]:
    """bf16 autocast around a forward of ``model`` (``amp="bf16"``); float32 master weights stay.

    Under autocast the attention scores are bf16 while the padding mask holds float32's minimum,
    which is -inf in bf16: a left-padding query that may attend to nothing then gets NaN, and
    0 x NaN reaches every real token above it. The scores are clamped to bf16's finite minimum
    (a fully masked row becomes uniform, a masked key still gets weight 0).
    """
    if amp == "none":
        yield
        return
    kind = torch.device(model.cfg.device).type
    hooks = [(f"blocks.{layer}.attn.hook_attn_scores", _finite_scores) for layer in range(model.cfg.n_layers)]
    with torch.autocast(device_type=kind if kind in ("cuda", "cpu", "mps") else "cpu", dtype=torch.bfloat16), \
            model.hooks(fwd_hooks=hooks):
        yield


def _finite_scores(scores: torch.Tensor, hook: Any) -> torch.Tensor:
    return scores.clamp_min(torch.finfo(scores.dtype).min)


def bf16_supported(device: str) -> bool:
    """Whether ``device`` computes in bfloat16 (CUDA: the GPU says; CPU: always, if slowly)."""
    if device.startswith("cuda"):
        return bool(torch.cuda.is_available() and torch.cuda.is_bf16_supported())
    return device == "cpu"  # CPU kernels exist for bf16 (slow but exact enough for CD-T scores)


THREADS_ENV = "CTSFT_THREADS"


def _free_and_total(fields: list[int], niced_yield: bool) -> tuple[int, int]:
    """Free and total jiffies from one ``/proc/stat`` cpu line (user nice system idle iowait irq
    softirq steal): idle and iowait are free; so is niced time when ``niced_yield`` (a process at
    nice <= 0 takes the cores from niced work: beside a niced two-thread training job the quickstart
    took 93 s with two threads against 118 s with one, benchmarks/RESULTS.md "Threads")."""
    free = fields[3] + (fields[4] if len(fields) > 4 else 0)
    if niced_yield:
        free += fields[1]
    return free, sum(fields[:8])


def idle_cores(window: float = 0.1, niced_yield: bool | None = None) -> float | None:
    """How many CPU cores were free over the last ``window`` seconds (Linux ``/proc/stat``; None
    elsewhere): idle, or running only niced work that yields to this process (``niced_yield``;
    default: when this process runs at nice <= 0). Instantaneous, unlike the load average, which
    lags a finished job by minutes."""
    if niced_yield is None:
        try:
            niced_yield = os.getpriority(os.PRIO_PROCESS, 0) <= 0
        except (AttributeError, OSError):
            niced_yield = False

    def snapshot() -> tuple[int, int] | None:
        try:
            with open("/proc/stat") as f:
                fields = [int(x) for x in f.readline().split()[1:]]
        except (OSError, ValueError):
            return None
        return _free_and_total(fields, niced_yield)

    first = snapshot()
    if first is None:
        return None
    time.sleep(window)
    second = snapshot()
    if second is None or second[1] == first[1]:
        return None
    return (os.cpu_count() or 1) * (second[0] - first[0]) / (second[1] - first[1])


def auto_threads() -> int:
    """Torch threads for this process: the cores free right now (:func:`idle_cores`: idle, or running
    only niced work that yields to this process), at least 1 (all cores where that
    cannot be read), shared among the ranks of this node under torchrun (``LOCAL_WORLD_SIZE``). Measured (benchmarks/RESULTS.md, "Threads"): on 2 idle cores 2 threads are
    1.5-1.8x faster than 1 for every model size; beside a busy neighbour 2 threads are 1.15-1.44x
    slower than 1 (and a whole test suite 6x), because torch's threads wait for each other at every
    op and one of them shares its core."""
    free = idle_cores()
    cores = os.cpu_count() or 1
    n = cores if free is None else max(1, min(cores, int(free + 0.5)))
    try:
        local = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    except ValueError:
        local = 1
    return max(1, n // local)


def resolve_threads(spec: str | int | None = None) -> int:
    """The thread count ``spec`` asks for: an integer, or ``"auto"`` (:func:`auto_threads`); default
    ``$CTSFT_THREADS``, else ``$OMP_NUM_THREADS`` (a user who set it meant it), else ``"auto"``. A
    bad value is one clear error."""
    if spec is None:
        spec = os.environ.get(THREADS_ENV) or os.environ.get("OMP_NUM_THREADS") or "auto"
    text = str(spec).strip().lower()
    if text == "auto":
        n = auto_threads()
    else:
        try:
            n = int(text)
        except ValueError:
            n = 0
        if n < 1:
            raise CtsftError(f"threads must be a whole number >= 1 or 'auto', got {spec!r} "
                             f"(the --threads flag, ${THREADS_ENV} or $OMP_NUM_THREADS)")
    return n


def set_threads(spec: str | int | None = None) -> int:
    """Set torch's intra-op threads to :func:`resolve_threads` of ``spec``; returns the count."""
    n = resolve_threads(spec)
    torch.set_num_threads(n)
    return n
