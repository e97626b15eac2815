"""Everything distributed: the launcher env contract, process-group setup, rank-0 helpers, reductions.

One training entrypoint runs under three launchers; this module turns what each
one sets into a ``DistEnv`` and the rest of the code only calls the helpers here.

- ``torchrun`` (laptop, or inside a pod): sets ``RANK``, ``WORLD_SIZE``,
  ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT`` for every worker it starts
  (and ``TORCHELASTIC_RESTART_COUNT``). torchrun itself reads ``PET_*`` as
  defaults for its own flags, so ``torchrun -m bincounter.train`` works as-is in
  a PyTorchJob or TrainJob pod.
- PyTorchJob (kubeflow.org/v1) without torchrun: one process per pod, the
  operator sets ``MASTER_ADDR``, ``MASTER_PORT``, ``WORLD_SIZE`` (pods) and
  ``RANK`` (pod index); ``LOCAL_RANK`` is 0.
- TrainJob (trainer.kubeflow.org/v1alpha1) without torchrun: only ``PET_NNODES``,
  ``PET_NPROC_PER_NODE``, ``PET_NODE_RANK``, ``PET_MASTER_ADDR``,
  ``PET_MASTER_PORT``. One process per node can run without torchrun (rank =
  node rank); more than one needs torchrun to start them, so we say so.
- Nothing set: a single process.
"""

from __future__ import annotations

import dataclasses
import datetime
import math
import os
from typing import Mapping, Sequence

import torch
import torch.distributed as dist


class DistEnvError(ValueError):
    """The launcher's environment is inconsistent or incomplete."""


@dataclasses.dataclass(frozen=True)
class DistEnv:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    master_addr: str | None = None
    master_port: int | None = None
    # "torchrun", "pytorchjob", "trainjob" or "single": where the values came from (logged).
    launcher: str = "single"
    # torchrun counts restarts of the worker group (--max-restarts); 0 on first start.
    restart_count: int = 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def env_vars(self) -> dict[str, str]:
        """The variables ``init_process_group(init_method="env://")`` reads."""
        out = {"RANK": str(self.rank), "WORLD_SIZE": str(self.world_size), "LOCAL_RANK": str(self.local_rank)}
        if self.master_addr is not None:
            out["MASTER_ADDR"] = self.master_addr
        if self.master_port is not None:
            out["MASTER_PORT"] = str(self.master_port)
        return out


def _int(environ: Mapping[str, str], name: str, default: int | None = None) -> int:
    raw = environ.get(name)
    if raw is None or raw == "":
        if default is None:
            raise DistEnvError(f"{name} is not set")
        return default
    try:
        return int(raw)
    except ValueError:
        raise DistEnvError(f"{name}={raw!r} is not an integer") from None


def resolve_env(environ: Mapping[str, str] | None = None) -> DistEnv:
    """Read the launcher contract (see the module docstring) from ``environ`` (default ``os.environ``)."""
    environ = os.environ if environ is None else environ
    restarts = _int(environ, "TORCHELASTIC_RESTART_COUNT", 0)
    if "RANK" in environ or "WORLD_SIZE" in environ:
        # torchrun and PyTorchJob both set the env:// variables; torchrun also sets
        # TORCHELASTIC_RUN_ID and LOCAL_RANK (a PyTorchJob pod runs one process: LOCAL_RANK=0).
        launcher = "torchrun" if "TORCHELASTIC_RUN_ID" in environ else "pytorchjob"
        nproc = environ.get("PET_NPROC_PER_NODE", "1")
        if launcher == "pytorchjob" and nproc != "1":
            raise DistEnvError(f"PET_NPROC_PER_NODE={nproc!r} asks for several processes per pod; only torchrun "
                               "starts them. Run `torchrun -m bincounter.train ...` (torchrun reads PET_*), "
                               "or set nprocPerNode: 1")
        env = DistEnv(rank=_int(environ, "RANK"), world_size=_int(environ, "WORLD_SIZE"),
                      local_rank=_int(environ, "LOCAL_RANK", 0),
                      master_addr=environ.get("MASTER_ADDR") or None,
                      master_port=_int(environ, "MASTER_PORT", 0) or None,
                      launcher=launcher, restart_count=restarts)
    elif "PET_NNODES" in environ:
        nnodes_raw = environ["PET_NNODES"]
        if ":" in nnodes_raw:
            raise DistEnvError(f"PET_NNODES={nnodes_raw!r} is an elastic range; start the job with "
                               "`torchrun -m bincounter.train ...`, which handles elastic node counts")
        nproc = environ.get("PET_NPROC_PER_NODE", "1")
        if nproc != "1":
            raise DistEnvError(f"PET_NPROC_PER_NODE={nproc!r} asks for several processes per node; only torchrun "
                               "starts them. Run `torchrun -m bincounter.train ...` (torchrun reads PET_*), "
                               "or set numProcPerNode: 1")
        env = DistEnv(rank=_int(environ, "PET_NODE_RANK", 0), world_size=_int(environ, "PET_NNODES"),
                      local_rank=0, master_addr=environ.get("PET_MASTER_ADDR") or None,
                      master_port=_int(environ, "PET_MASTER_PORT", 0) or None,
                      launcher="trainjob", restart_count=restarts)
    else:
        return DistEnv(restart_count=restarts)

    if env.world_size < 1:
        raise DistEnvError(f"World size must be >= 1, got {env.world_size} (from {env.launcher} variables)")
    if not 0 <= env.rank < env.world_size:
        raise DistEnvError(f"Rank {env.rank} is outside 0..{env.world_size - 1} (from {env.launcher} variables)")
    if env.distributed and (env.master_addr is None or env.master_port is None):
        missing = "PET_MASTER_ADDR/PET_MASTER_PORT" if env.launcher == "trainjob" else "MASTER_ADDR/MASTER_PORT"
        raise DistEnvError(f"World size {env.world_size} needs {missing} to find rank 0, but they are not set")
    return env


def select_device(requested: str, env: DistEnv) -> torch.device:
    """``auto`` picks this process's GPU (``cuda:LOCAL_RANK``) when there is one, else the CPU."""
    if requested not in ("auto", "cpu", "cuda"):
        raise ValueError(f"Invalid device {requested!r}. Only auto, cpu and cuda are supported.")
    if requested == "cpu" or (requested == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise RuntimeError("--device cuda was given but no CUDA GPU is visible (check CUDA_VISIBLE_DEVICES)")
    index = env.local_rank % torch.cuda.device_count()
    torch.cuda.set_device(index)
    return torch.device("cuda", index)


def init_distributed(env: DistEnv, device: torch.device, timeout_s: float = 1800) -> None:
    """Join the process group (env://): nccl for GPUs, gloo for CPUs. A no-op for one process."""
    if not env.distributed or dist.is_initialized():
        return
    # TrainJob-without-torchrun leaves the env:// variables unset; fill them from what we resolved.
    for key, value in env.env_vars().items():
        os.environ.setdefault(key, value)
    backend = "nccl" if device.type == "cuda" else "gloo"
    timeout = datetime.timedelta(seconds=timeout_s)
    kwargs = {"init_method": "env://"}
    if env.restart_count > 0:
        # After a torchrun restart the agent's store still holds the previous attempt's keys, and
        # gloo would dial the dead workers' addresses (seen with torch 2.14, static and c10d
        # rendezvous). A per-attempt key prefix gives the new group a clean namespace.
        agent_store = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
        store = dist.TCPStore(env.master_addr, env.master_port, env.world_size,
                              is_master=not agent_store and env.rank == 0, timeout=timeout)
        kwargs = {"store": dist.PrefixStore(f"bincounter/attempt-{env.restart_count}", store)}
    dist.init_process_group(backend=backend, rank=env.rank, world_size=env.world_size, timeout=timeout,
                            device_id=device if device.type == "cuda" else None, **kwargs)


def cleanup() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def is_dist_avail_and_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def get_rank() -> int:
    return dist.get_rank() if is_dist_avail_and_initialized() else 0


def get_world_size() -> int:
    return dist.get_world_size() if is_dist_avail_and_initialized() else 1


def is_main_process() -> bool:
    return get_rank() == 0


def save_on_master(write, *args, **kwargs) -> None:
    """Call ``write(*args, **kwargs)`` on rank 0 only (e.g. ``storage.write_bytes``, ``save_model_dir``)."""
    if is_main_process():
        write(*args, **kwargs)


def print_on_master(*args, **kwargs) -> None:
    if is_main_process():
        print(*args, **kwargs)


def barrier() -> None:
    if is_dist_avail_and_initialized():
        dist.barrier()


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum ``tensor`` over ranks, in place, and return it (unchanged for one process).

    gloo reduces CPU tensors and nccl CUDA tensors; pass a tensor on the training device.
    """
    if is_dist_avail_and_initialized():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def reduce_sums(values: dict[str, float], device: torch.device) -> dict[str, float]:
    """Sum several scalars over ranks in one collective (e.g. loss sums and sample counts)."""
    keys = sorted(values)
    t = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64, device=device)
    all_reduce_sum(t)
    return dict(zip(keys, t.tolist()))


def broadcast_buffers(module: torch.nn.Module, src: int = 0) -> None:
    """Copy rank ``src``'s buffers (BatchNorm running statistics) to every rank.

    DDP syncs buffers at the start of each forward, then every rank updates its own
    copy with its own batch; evaluation and checkpoints want one version.
    """
    if is_dist_avail_and_initialized():
        for buf in module.buffers():
            dist.broadcast(buf, src)


def broadcast_object(obj, src: int = 0):
    """Rank ``src``'s ``obj`` on every rank (e.g. a decision only rank 0 can make)."""
    if not is_dist_avail_and_initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def balance(sizes: Sequence[int], parts: int) -> list[list[int]]:
    """Split items (shards) into ``parts`` lists of indices with sample totals as even as possible.

    Greedy longest-first (LPT): largest item first, each to the part with the fewest samples
    so far (ties: the lower part). Deterministic, so every rank computes the same assignment;
    items of equal size keep their given order (the epoch's shuffled shard order).
    """
    loads, out = [0] * parts, [[] for _ in range(parts)]
    for i in sorted(range(len(sizes)), key=lambda i: -sizes[i]):
        p = min(range(parts), key=lambda p: (loads[p], p))
        out[p].append(i)
        loads[p] += sizes[i]
    return [sorted(o) for o in out]


def partition(n_shards: int, rank: int, world_size: int, worker: int, num_workers: int,
              sizes: Sequence[int] | None = None):
    """Which shards, and which samples inside them, one DataLoader worker of one rank reads.

    Returns ``(shard_indices, rank_stride, worker_stride, worker_offset)``:

    - ranks split shards when there are at least as many shards as ranks
      (``rank_stride == 1``); otherwise every rank reads every shard and keeps
      sample ``j`` of shard ``s`` when ``(s + j) % world_size == rank``, so no
      rank is left without data and no sample is read twice;
    - with ``sizes`` (samples per shard, from the split manifest) shards go to ranks and
      workers by ``balance``, so ranks get nearly equal sample counts; without them, round robin;
    - inside a rank, workers split that rank's shards the same way, or, with
      fewer shards than workers, each keeps every ``num_workers``-th sample of
      the rank's stream (``worker_stride``, ``worker_offset``).

    Every sample goes to exactly one (rank, worker). Ranks may still get
    different sample counts (a few large shards cannot always be split evenly); the
    training loop copes with that (``train.train_one_epoch``).
    """
    shards = list(range(n_shards))
    if n_shards >= world_size:
        shards = balance(sizes, world_size)[rank] if sizes is not None else shards[rank::world_size]
        rank_stride = 1
    else:
        rank_stride = world_size
    if len(shards) >= num_workers:
        if sizes is not None and rank_stride == 1:
            return [shards[i] for i in balance([sizes[s] for s in shards], num_workers)[worker]], 1, 1, 0
        return shards[worker::num_workers], rank_stride, 1, 0
    return shards, rank_stride, num_workers, worker


def batches_per_rank(sizes: Sequence[int], world_size: int, num_workers: int, batch_size: int) -> list[int]:
    """How many batches each rank's DataLoader yields in an epoch, from samples per shard.

    Each DataLoader worker batches its own stream, so a rank yields the sum over its
    workers of ceil(worker samples / batch). The training loop runs as many steps as
    the longest rank (``max`` of this).
    """
    num_workers = max(1, num_workers)
    out = []
    for rank in range(world_size):
        n = 0
        for worker in range(num_workers):
            picked, rank_stride, worker_stride, worker_offset = partition(
                len(sizes), rank, world_size, worker, num_workers, sizes)
            samples = sum(sizes[s] for s in picked) / rank_stride / worker_stride  # strided: about even
            n += math.ceil(samples / batch_size)
        out.append(n)
    return out
