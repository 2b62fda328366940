"""Meta-training over several processes and machines with torch.distributed (launched by torchrun).

The meta-batch is sharded by task: each rank adapts its own tasks (`shard_range`; the samplers take
`shard=(rank, world_size)`), computes the meta-gradient of its part, and `all_reduce_gradients` sums the parts
weighted by their share of the tasks. Tasks are independent in MAML, Reptile and their kin (BatchNorm statistics
are per task), so the result equals one process stepping on the union of the ranks' tasks, up to float rounding.

Two ways to synchronise:
- explicitly: `loss.backward()` (or `reptile_step`, which writes .grad itself), then
  `all_reduce_gradients(params, weight=len(my_tasks) / total_tasks)`, then the optimiser step;
- DistributedDataParallel around a module whose forward runs the meta-step and returns the loss (DDP only
  synchronises gradients that a backward through its forward produces: not Reptile's, which are written
  directly).

With NCCL (gradients on GPUs), what the host must know at once (which parameters have gradients anywhere,
`any_rank`'s flag) goes through a gloo group over the same processes, so that no step waits for its GPU.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Iterable

import torch
import torch.distributed as dist
from torch import Tensor, nn

from fastmeta.data.episodes import shard_range

__all__ = ["world", "init_from_env", "shard_range", "all_reduce_gradients", "any_rank", "broadcast_parameters", "close"]


def world() -> tuple[int, int]:
    """(rank, world_size) of this process: (0, 1) when no process group is initialised."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def init_from_env(backend: str | None = None) -> tuple[int, int]:
    """Initialises the default process group from torchrun's environment (RANK, WORLD_SIZE, MASTER_ADDR,
    MASTER_PORT) when WORLD_SIZE > 1 and no group exists yet. backend: "gloo" on CPUs, "nccl" where CUDA is
    available (default). Returns (rank, world_size); (0, 1) for a plain single process."""
    if dist.is_available() and dist.is_initialized():
        return world()
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size <= 1:
        return 0, 1
    if not dist.is_available():
        raise RuntimeError("WORLD_SIZE > 1 but this torch build has no torch.distributed")
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    # torch.distributed.nn.functional takes group.WORLD as the default argument of its functions when it is
    # imported, and torch._dynamo (which the first optimiser imports) imports it: imported after the group
    # exists, it would hold the group for good, so that `close` could not free it and gloo's threads would
    # outlive the interpreter (an abort at exit, now and then). Imported first, it holds None.
    importlib.import_module("torch.distributed.nn")

    dist.init_process_group(backend)
    return world()


def close() -> None:
    """Waits until every rank gets here, then destroys the default process group; does nothing without one.
    Call it at the end of a distributed run: a rank that destroys its group while another still works (rank 0
    writing a checkpoint) can abort in gloo's teardown. A group made by `init_from_env` is then freed with its
    threads; one made by your own `init_process_group` is too only if torch.distributed.nn was imported before
    (see init_from_env)."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        _host_groups.clear()
        dist.destroy_process_group()


def all_reduce_gradients(
    params: Iterable[Tensor] | nn.Module, weight: float | None = None, extra: Tensor | None = None
) -> Tensor | None:
    """Replaces each parameter's .grad by the sum over ranks of `weight` * its .grad, in one all-reduce of a
    flat buffer. weight: this rank's share of the meta-batch (its tasks / all tasks) when its loss is a mean
    over its own tasks; default 1 / world_size (equal shares). A parameter without a gradient on any rank
    keeps .grad None; one with a gradient on some ranks counts as zero on the others.

    extra: a 1-d float tensor summed over ranks in the same all-reduce, unweighted (e.g. losses to log or a
    stop flag); returned. Without a process group this only scales by `weight` (default 1)."""
    params = list(params.parameters() if isinstance(params, nn.Module) else params)
    rank, size = world()
    if weight is None:
        weight = 1.0 / size
    grads = [p.grad for p in params]
    present = [g is not None for g in grads]
    if size == 1:
        for g in grads:
            if g is not None and weight != 1.0:
                g.mul_(weight)
        return extra
    if not params and extra is None:
        return None
    ref = params[0] if params else extra
    device, dtype = ref.device, torch.float64 if ref.dtype == torch.float64 else torch.float32
    pieces = [
        (g.detach().reshape(-1).to(dtype) * weight)
        if g is not None
        else torch.zeros(p.numel(), device=device, dtype=dtype)
        for p, g in zip(params, grads)
    ]
    total = sum(p.numel() for p in params)
    host = _host_group()
    if host is dist.group.WORLD:  # gloo (CPU gradients): which ones exist goes in the same buffer, read once
        host = None
    if host is None:
        pieces.append(torch.tensor(present, device=device, dtype=dtype))
    if extra is not None:
        pieces.append(extra.detach().reshape(-1).to(device=device, dtype=dtype))
    flat = torch.cat(pieces)
    dist.all_reduce(flat)
    if host is None:
        anywhere = (flat[total : total + len(params)] > 0).tolist()  # one host read, not one per parameter
        extra_at = total + len(params)
    else:  # NCCL (GPU gradients): the flags through the gloo host group, so reading them never waits for the GPU
        flags = torch.tensor(present, dtype=torch.int32)
        dist.all_reduce(flags, group=host)
        anywhere, extra_at = (flags > 0).tolist(), total
    offset = 0
    for p, has_grad in zip(params, anywhere):
        n = p.numel()
        if has_grad:
            g = flat[offset : offset + n].view_as(p).to(p.dtype)
            if p.grad is None:
                p.grad = g.clone()
            else:
                p.grad.copy_(g)
        offset += n
    if extra is None:
        return None
    return flat[extra_at:].to(extra.dtype).view_as(extra)


def any_rank(flag: bool) -> bool:
    """Whether `flag` is true on any process (the same answer on every one); `flag` itself without a process
    group. Through the host group where there is one, so that it does not wait for a GPU."""
    if world()[1] == 1:
        return flag
    host = _host_group()
    t = torch.tensor([int(flag)], dtype=torch.int32)
    if host is None:  # no gloo: through the default group's device
        t = t.to("cuda" if dist.get_backend() == "nccl" else "cpu")
    dist.all_reduce(t, group=host)
    return bool(t.item() > 0)


# Tests set this to make the host group a gloo group of its own even where the default group is gloo, to run
# the path that NCCL jobs take.
_SEPARATE_HOST_GROUP = False
_host_groups: dict[int, object] = {}


def _host_group() -> object | None:
    """The process group for values the host holds (which parameters have gradients, a stop flag): the default
    group where it is gloo; else a gloo group over the same processes, made on first use (by every process
    together, as they all reach their first all-reduce), so exchanging those values never waits for a GPU.
    None without gloo."""
    if dist.get_backend() == "gloo" and not _SEPARATE_HOST_GROUP:
        return dist.group.WORLD
    if not dist.is_gloo_available():
        return None
    key = id(dist.group.WORLD)  # a new default group (init, destroy, init) gets a new host group
    if key not in _host_groups:
        _host_groups.clear()
        _host_groups[key] = dist.new_group(backend="gloo")
    return _host_groups[key]


def broadcast_parameters(module: nn.Module, src: int = 0) -> None:
    """Copies rank `src`'s parameters and buffers to every rank (call once after building the model)."""
    if world()[1] == 1:
        return
    with torch.no_grad():
        for t in list(module.parameters()) + list(module.buffers()):
            dist.broadcast(t.data, src)
