"""Scale-out on PyTorch's own engine (``torch.distributed`` launched by ``torchrun``).

Launch any ``ctsft`` command with ``torchrun --nproc_per_node N -m ctsft_lens.cli ...`` and the
process group is set up from torchrun's environment (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``,
``MASTER_ADDR``/``MASTER_PORT``): gloo for CPU tensors and, where CUDA is visible, NCCL for CUDA
tensors, each rank on ``cuda:LOCAL_RANK``. What then runs over the ranks:

* **data parallel reductions** (:func:`head_means`, CD-T relevance, mean-ablation metrics,
  prediction): each rank takes whole batches of the examples (:func:`shard_indices`), and sums
  are all-reduced (:func:`all_reduce_sum`) or per-example values gathered back into the original
  order (:func:`gather_examples`). Every batch is the one the single-process run forms, so the
  per-example values are those of the single process exactly; only the order of a few float64
  sums changes;
* **training**: an explicit all-reduce of the (masked) gradients once per optimizer step
  (:func:`all_reduce_grads`), see :func:`ctsft_lens.train.train`;
* **experiment grids**: whole transfer cells per rank, see :func:`ctsft_lens.experiments.run_experiment`.

Without a process group (a plain ``python``/``ctsft`` run) every function here is the identity:
rank 0 of a world of 1. Inside :func:`alone` too: a rank that works on a cell of its own (an
experiment grid) runs the library single-process while the group stays up for coordination.
"""

from __future__ import annotations

import contextlib
import datetime
import os
from typing import Any, Callable, Iterator, Sequence, TypeVar

import torch

from ctsft_lens.errors import CtsftError

T = TypeVar("T")
_alone = 0  # > 0 inside alone(): the library does not shard, collectives are identities


def _dist() -> Any:
    import torch.distributed as dist

    return dist


def launched() -> bool:
    """Whether this process was started by ``torchrun`` (or another launcher setting ``RANK`` and ``WORLD_SIZE``)."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def group_up() -> bool:
    """Whether a process group is initialised (coordination works, even inside :func:`alone`)."""
    dist = _dist()
    return dist.is_available() and dist.is_initialized()


def active() -> bool:
    """Whether work is split over ranks here: a process group of 2+ ranks, outside :func:`alone`."""
    return _alone == 0 and group_up() and _dist().get_world_size() > 1


def rank() -> int:
    """This process's rank in the work split (0 without a group or inside :func:`alone`)."""
    return _dist().get_rank() if active() else 0


def world() -> int:
    """Number of ranks sharing the work (1 without a group or inside :func:`alone`)."""
    return _dist().get_world_size() if active() else 1


def group_rank() -> int:
    """The rank in the process group, even inside :func:`alone` (0 without a group)."""
    return _dist().get_rank() if group_up() else 0


def group_size() -> int:
    """The size of the process group, even inside :func:`alone` (1 without a group)."""
    return _dist().get_world_size() if group_up() else 1


def is_main() -> bool:
    """Rank 0 of the group (or a single process): the one that writes outputs and prints."""
    return group_rank() == 0


def local_rank() -> int:
    """This process's index on its node (torchrun's ``LOCAL_RANK``; 0 elsewhere)."""
    return int(os.environ.get("LOCAL_RANK", "0"))


def rank_device(spec: str | None) -> str | None:
    """The device of this rank: ``auto`` / ``cuda`` become ``cuda:LOCAL_RANK`` under torchrun when
    CUDA is visible (one GPU per process); anything else is returned as given."""
    if not launched() or spec is None:
        return spec
    name = spec.strip().lower()
    if name in ("auto", "cuda") and torch.cuda.is_available():
        return f"cuda:{local_rank() % torch.cuda.device_count()}"
    return spec


def init(timeout_minutes: float = 60.0) -> bool:
    """Join the process group of a torchrun launch (no-op otherwise, or if already joined).

    Backend: ``CTSFT_DIST_BACKEND`` if set, else ``cpu:gloo,cuda:nccl`` where CUDA is visible (CPU
    tensors over gloo, CUDA tensors over NCCL) and ``gloo`` elsewhere. Returns whether this call
    created the group (the caller then calls :func:`destroy` at the end).
    """
    if not launched():
        return False
    dist = _dist()
    if dist.is_initialized():
        return False
    backend = os.environ.get("CTSFT_DIST_BACKEND") or ("cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo")
    if torch.cuda.is_available() and "nccl" in backend:
        torch.cuda.set_device(local_rank() % torch.cuda.device_count())
    try:
        dist.init_process_group(backend, timeout=datetime.timedelta(minutes=timeout_minutes))
    except (RuntimeError, ValueError) as err:
        raise CtsftError(f"could not join the torchrun process group ({backend}): {err}") from None
    return True


def destroy() -> None:
    """Leave the process group (no-op without one)."""
    if group_up():
        _dist().destroy_process_group()


@contextlib.contextmanager
def alone() -> Iterator[None]:
    """Run the library single-process inside the block (no sharding, collectives are identities),
    while :func:`barrier`, :func:`on_main` and the ``group_*`` functions still coordinate ranks."""
    global _alone
    _alone += 1
    try:
        yield
    finally:
        _alone -= 1


# --------------------------------------------------------------------------------------------
# splitting examples
# --------------------------------------------------------------------------------------------
def shard_indices(n: int, batch_size: int = 1, *, strided: bool = True) -> list[int]:
    """Indices of the examples this rank takes: whole batches of ``batch_size`` consecutive examples.

    ``strided`` (default): batch ``b`` goes to rank ``b % world`` (balanced when prompt lengths
    drift along the list); else contiguous blocks of batches (rank 0 the first block). Either way
    every batch is the one a single process forms, so padding, and therefore each example's
    values, are unchanged. A rank may get no example (fewer batches than ranks).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    n_batches = (n + batch_size - 1) // batch_size
    if strided:
        mine = range(rank(), n_batches, world())
    else:
        per = (n_batches + world() - 1) // world()
        mine = range(rank() * per, min(n_batches, (rank() + 1) * per))
    return [i for b in mine for i in range(b * batch_size, min(n, (b + 1) * batch_size))]


def shard(examples: Sequence[T], batch_size: int = 1, *, strided: bool = True) -> tuple[list[T], list[int]]:
    """This rank's examples and their indices in ``examples`` (see :func:`shard_indices`)."""
    index = shard_indices(len(examples), batch_size, strided=strided)
    return [examples[i] for i in index], index


# --------------------------------------------------------------------------------------------
# collectives (identities without a group)
# --------------------------------------------------------------------------------------------
def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum ``tensor`` over ranks, in place; returns it (unchanged with one rank)."""
    if active():
        _dist().all_reduce(tensor, op=_dist().ReduceOp.SUM)
    return tensor


def all_reduce_max(tensor: torch.Tensor) -> torch.Tensor:
    """Element-wise maximum of ``tensor`` over ranks, in place; NaN wins (as in ``torch.maximum``)."""
    if active():
        nan = all_reduce_sum(tensor.isnan().double()) > 0 if tensor.is_floating_point() else None
        _dist().all_reduce(tensor, op=_dist().ReduceOp.MAX)
        if nan is not None:
            tensor[nan] = float("nan")
    return tensor


def gather_examples(values: torch.Tensor, index: Sequence[int], n: int, dim: int = 0) -> torch.Tensor:
    """Per-example ``values`` of this rank's examples (``index`` into ``0..n-1``, along ``dim``)
    gathered into one tensor of all ``n`` examples in their original order, on every rank.

    Exact: each position is written by one rank and the others add zeros (NaN stays NaN).
    """
    index_t = torch.as_tensor(list(index), dtype=torch.long, device=values.device)
    if not active():
        if len(index_t) == n and bool((index_t == torch.arange(n, device=values.device)).all()):
            return values
    shape = list(values.shape)
    shape[dim] = n
    out = torch.zeros(shape, dtype=values.dtype, device=values.device)
    out.index_copy_(dim, index_t, values)
    return all_reduce_sum(out)


def barrier() -> None:
    """Wait for every rank of the group (no-op without one; works inside :func:`alone`)."""
    if group_up() and group_size() > 1:
        _dist().barrier()


def all_ok(error: BaseException | None, what: str = "a rank") -> None:
    """A barrier that carries errors: every rank raises if any rank failed (so none waits forever)."""
    if not (group_up() and group_size() > 1):
        if error is not None:
            raise error
        return
    messages: list[Any] = [None] * group_size()
    _dist().all_gather_object(messages, None if error is None else f"{type(error).__name__}: {error}")
    if error is not None:
        raise error
    failed = [(r, m) for r, m in enumerate(messages) if m is not None]
    if failed:
        r, m = failed[0]
        raise CtsftError(f"{what} failed on rank {r}: {m}")


def on_main(fn: Callable[[], T], what: str = "a rank-0 step") -> T | None:
    """Run ``fn`` on rank 0 only (writing files, a stage the others then read from the cache);
    every rank waits, and raises if it failed. Returns ``fn()`` on rank 0 and ``None`` elsewhere."""
    value, error = None, None
    if is_main():
        try:
            value = fn()
        except BaseException as err:  # noqa: BLE001 - re-raised below, after telling the others
            error = err
    all_ok(error, what)
    return value


def broadcast_parameters(model: torch.nn.Module) -> None:
    """Copy rank 0's parameters and buffers to every rank (so training starts from one model)."""
    if not active():
        return
    with torch.no_grad():
        seen: set[int] = set()
        for t in [*model.parameters(), *model.buffers()]:
            if id(t) in seen:
                continue
            seen.add(id(t))
            if t.is_contiguous():
                _dist().broadcast(t.data, src=0)
            else:  # a view into another tensor's storage (GPT-2's split c_attn): via a contiguous copy
                buf = t.detach().contiguous()
                _dist().broadcast(buf, src=0)
                t.data.copy_(buf)


def all_reduce_grads(params: Sequence[torch.nn.Parameter], masks: dict[Any, torch.Tensor | None] | None = None,
                     bucket_mb: float = 64.0) -> None:
    """Sum the gradients of ``params`` over ranks, once per optimizer step, in flat buckets.

    With ``masks[p]`` (a bool tensor of the trainable elements) only those elements travel: the
    rest are zero by the gradient hooks, and frozen elements are never written. A parameter
    without a gradient on some rank (no example there this step) counts as zeros; one without a
    gradient on every rank keeps ``grad = None`` (the optimizer skips it, as in one process).
    """
    if not active() or not params:
        return
    masks = masks or {}
    present = torch.tensor([p.grad is not None for p in params], dtype=torch.float32)
    all_reduce_sum(present)
    chosen = [p for p, k in zip(params, present.tolist()) if k > 0]
    for p in chosen:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    limit = int(bucket_mb * 2**20)
    bucket: list[torch.nn.Parameter] = []
    size = 0
    for p in chosen + [None]:  # type: ignore[list-item]
        if bucket and (p is None or size + _n_bytes(p, masks) > limit or p.grad.dtype != bucket[0].grad.dtype
                       or p.grad.device != bucket[0].grad.device):
            _reduce_bucket(bucket, masks)
            bucket, size = [], 0
        if p is not None:
            bucket.append(p)
            size += _n_bytes(p, masks)


def _n_bytes(p: torch.nn.Parameter, masks: dict[Any, torch.Tensor | None]) -> int:
    mask = masks.get(p)
    n = p.numel() if mask is None else int(mask.sum())
    return n * p.grad.element_size()


def _reduce_bucket(bucket: list[torch.nn.Parameter], masks: dict[Any, torch.Tensor | None]) -> None:
    parts = [p.grad.reshape(-1) if masks.get(p) is None else p.grad[masks[p]] for p in bucket]
    flat = torch.cat(parts)
    all_reduce_sum(flat)
    offset = 0
    for p in bucket:
        mask = masks.get(p)
        n = p.numel() if mask is None else int(mask.sum())
        chunk = flat[offset:offset + n]
        if mask is None:
            p.grad.copy_(chunk.view_as(p.grad))
        else:
            p.grad[mask] = chunk
        offset += n


def broadcast_object(obj: T, src: int = 0) -> T:
    """``obj`` of rank ``src`` on every rank of the group (identity without one)."""
    if not (group_up() and group_size() > 1):
        return obj
    box = [obj]
    _dist().broadcast_object_list(box, src=src)
    return box[0]
