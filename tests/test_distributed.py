"""The launcher env contracts (torchrun, PyTorchJob, TrainJob), process-group setup, and data partitioning."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import textwrap
from collections import Counter

import pytest

from bincounter import distributed as d


def test_nothing_set_is_one_process():
    env = d.resolve_env({})
    assert (env.rank, env.world_size, env.local_rank, env.launcher, env.distributed) == (0, 1, 0, "single", False)


def test_torchrun_contract():
    # What torchrun sets for the 4th worker of 2 nodes x 2 processes, after one restart.
    environ = {"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2", "GROUP_RANK": "1",
               "MASTER_ADDR": "10.0.0.5", "MASTER_PORT": "29500", "TORCHELASTIC_RUN_ID": "abc",
               "TORCHELASTIC_RESTART_COUNT": "1",
               # the PET_* a PyTorchJob/TrainJob pod also carries; torchrun's values win
               "PET_NNODES": "2", "PET_NPROC_PER_NODE": "2", "PET_NODE_RANK": "1"}
    env = d.resolve_env(environ)
    assert env == d.DistEnv(rank=3, world_size=4, local_rank=1, master_addr="10.0.0.5", master_port=29500,
                            launcher="torchrun", restart_count=1)


def test_pytorchjob_contract_one_process_per_pod():
    # kubeflow.org/v1 PyTorchJob worker pod 2 of 1 master + 2 workers, no torchrun.
    environ = {"MASTER_ADDR": "job-master-0", "MASTER_PORT": "23456", "WORLD_SIZE": "3", "RANK": "2",
               "PET_NPROC_PER_NODE": "1"}
    env = d.resolve_env(environ)
    assert env == d.DistEnv(rank=2, world_size=3, local_rank=0, master_addr="job-master-0", master_port=23456,
                            launcher="pytorchjob")
    assert env.env_vars() == {"RANK": "2", "WORLD_SIZE": "3", "LOCAL_RANK": "0",
                              "MASTER_ADDR": "job-master-0", "MASTER_PORT": "23456"}


def test_trainjob_contract_derives_env_vars():
    # trainer.kubeflow.org TrainJob node 1 of 3: only PET_* are set.
    environ = {"PET_NNODES": "3", "PET_NPROC_PER_NODE": "1", "PET_NODE_RANK": "1",
               "PET_MASTER_ADDR": "tj-node-0-0.tj", "PET_MASTER_PORT": "29400"}
    env = d.resolve_env(environ)
    assert (env.rank, env.world_size, env.local_rank, env.launcher) == (1, 3, 0, "trainjob")
    assert env.env_vars() == {"RANK": "1", "WORLD_SIZE": "3", "LOCAL_RANK": "0",
                              "MASTER_ADDR": "tj-node-0-0.tj", "MASTER_PORT": "29400"}


@pytest.mark.parametrize("environ, message", [
    ({"PET_NNODES": "2", "PET_NPROC_PER_NODE": "4", "PET_NODE_RANK": "0", "PET_MASTER_ADDR": "a",
      "PET_MASTER_PORT": "1"}, "only torchrun starts them"),
    ({"PET_NNODES": "1:4", "PET_NODE_RANK": "0"}, "elastic range"),
    ({"PET_NNODES": "2", "PET_NODE_RANK": "0"}, "PET_MASTER_ADDR/PET_MASTER_PORT"),
    ({"RANK": "0", "WORLD_SIZE": "2", "MASTER_ADDR": "a", "MASTER_PORT": "1", "PET_NPROC_PER_NODE": "2"},
     "only torchrun starts them"),
    ({"RANK": "2", "WORLD_SIZE": "2", "MASTER_ADDR": "a", "MASTER_PORT": "1"}, "outside 0..1"),
    ({"RANK": "1", "WORLD_SIZE": "2"}, "MASTER_ADDR/MASTER_PORT"),
    ({"RANK": "x", "WORLD_SIZE": "2"}, "RANK='x' is not an integer"),
    ({"WORLD_SIZE": "2"}, "RANK is not set"),
])
def test_bad_env_is_named(environ, message):
    with pytest.raises(d.DistEnvError, match=message):
        d.resolve_env(environ)


@pytest.mark.parametrize("shard_sizes, world, workers", [
    ([30, 30, 30, 30, 30, 20], 2, 2),  # shards split by rank, then by worker
    ([30, 30, 25], 2, 3),  # ranks split shards, fewer shards than workers: workers split samples
    ([30, 7], 4, 1),  # fewer shards than ranks: ranks split samples
    ([5], 3, 2),  # one shard, three ranks, two workers each
    ([10, 10, 10, 10, 10], 2, 1),  # uneven shard count per rank
])
@pytest.mark.parametrize("balanced", [False, True])
def test_partition_reads_every_sample_exactly_once(shard_sizes, world, workers, balanced):
    seen = Counter()
    per_rank = Counter()
    for rank in range(world):
        for worker in range(workers):
            shards, rank_stride, worker_stride, worker_offset = d.partition(
                len(shard_sizes), rank, world, worker, workers, shard_sizes if balanced else None)
            kept = 0  # the dataset's rule (bincounter.data.loader.ShardDataset._samples)
            for s in shards:
                for j in range(shard_sizes[s]):
                    if rank_stride > 1 and (s + j) % rank_stride != rank:
                        continue
                    kept += 1
                    if (kept - 1) % worker_stride == worker_offset:
                        seen[(s, j)] += 1
                        per_rank[rank] += 1
    assert sorted(seen) == [(s, j) for s, n in enumerate(shard_sizes) for j in range(n)]
    assert set(seen.values()) == {1}
    assert all(per_rank[r] > 0 for r in range(world))  # no rank idles


def test_ranks_are_balanced_by_samples_and_steps_come_from_the_longest_rank():
    # The case: round robin gave rank 0 shards 0 and 2 (400 samples) and rank 1 210, or the
    # other way round; by sample count the two ranks get 400 / 210 at best with four shards, and
    # with eight shards the split is even.
    assert d.balance([200, 200, 200, 10], 2) == [[0, 2], [1, 3]]
    assert d.batches_per_rank([200, 200, 200, 10], 2, 1, 8) == [50, 27]
    assert d.balance([10, 200, 10, 200, 200, 10, 200, 10], 2) == [[0, 1, 4, 5], [2, 3, 6, 7]]
    assert d.batches_per_rank([10, 200, 10, 200, 200, 10, 200, 10], 2, 1, 8) == [53, 53]
    # a DataLoader worker batches its own stream: 2 workers of 25 samples give 4 + 4 batches of 8
    assert d.batches_per_rank([25, 25], 1, 2, 8) == [8]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_trainjob_env_without_torchrun_forms_a_process_group(tmp_path):
    """Two real processes that only see TrainJob's PET_* join one gloo group and reduce a tensor."""
    script = textwrap.dedent("""
        import torch
        from bincounter import distributed as d
        env = d.resolve_env()
        d.init_distributed(env, torch.device("cpu"), timeout_s=60)
        total = d.reduce_sums({"x": env.rank + 1.0}, torch.device("cpu"))["x"]
        print(f"rank={d.get_rank()} world={d.get_world_size()} main={d.is_main_process()} total={total}")
        d.cleanup()
    """)
    port = str(_free_port())
    base = {k: v for k, v in os.environ.items()
            if not k.startswith("PET_") and k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                       "MASTER_PORT")}
    procs = [subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True,
                              env={**base, "PET_NNODES": "2", "PET_NPROC_PER_NODE": "1", "PET_NODE_RANK": str(r),
                                   "PET_MASTER_ADDR": "127.0.0.1", "PET_MASTER_PORT": port,
                                   "OMP_NUM_THREADS": "1"})
             for r in range(2)]
    outs = [p.communicate(timeout=120)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    assert "rank=0 world=2 main=True total=3.0" in outs[0]
    assert "rank=1 world=2 main=False total=3.0" in outs[1]
