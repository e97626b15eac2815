"""DDP with ranks of uneven sizes: padding steps must not touch BatchNorm statistics or the optimizer.

The defect (issue 12): a rank that had run out of data repeated its last batch with weight 0,
in train mode, so each repeat updated its BatchNorm running statistics; DDP ships rank 0's
buffers, so when rank 0 was the short rank the saved model carried the statistics of one tiny
batch (measured: test accuracy 0.56 as saved, 0.88 with BN re-estimated). Here rank 0 holds one
batch of 2 images and rank 1 four batches of 8, as shards 200/200/200/10 over 2 ranks do at
scale. The first layer is a BatchNorm, so its running statistics depend only on the images it
saw: after the epoch, rank 0's must be one momentum step from the initial ones with its own
batch, whatever the other rank did. Two real processes (torch.multiprocessing, gloo), seconds.
"""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from bincounter import distributed as dist_utils
from bincounter import train as tr

BATCHES = {0: [2], 1: [8, 8, 8, 8]}  # images per batch on each rank


def _batches(rank: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(rank)
    return [(torch.randn(n, 3, 16, 16, generator=g) * (1 + rank) + rank, torch.randint(0, 3, (n,), generator=g))
            for n in BATCHES[rank]]


def _worker(rank: int, port: int, results) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        torch.manual_seed(0)
        net = torch.nn.Sequential(torch.nn.BatchNorm2d(3), torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4),
                                  torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(),
                                  torch.nn.Linear(4, 3))
        ddp = torch.nn.parallel.DistributedDataParallel(net)
        cfg = tr.TrainConfig(data="d", output="o", pretrained="", epochs=1, input_size=64, print_freq=1000)
        optimizer = tr.make_optimizer(net, cfg, 1e-2)
        scaler = torch.amp.GradScaler("cpu", enabled=False)
        criterion = torch.nn.CrossEntropyLoss(reduction="sum")
        row = tr.train_one_epoch(ddp, _batches(rank), criterion, optimizer, scaler, torch.device("cpu"), 0, cfg,
                                 4, 1e-2)
        bn = net[0]
        params = torch.cat([p.detach().flatten() for p in net.parameters()])
        state = optimizer.state_dict()["state"]
        results[rank] = {"running_mean": bn.running_mean.clone(), "running_var": bn.running_var.clone(),
                         "tracked": int(bn.num_batches_tracked), "params": params,
                         "adam_steps": sorted({float(s["step"]) for s in state.values()}),
                         "steps": row["train-steps"], "samples": row["train-samples"]}
        dist_utils.barrier()
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def uneven_run():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with mp.Manager() as manager:
        results = manager.dict()
        mp.spawn(_worker, args=(port, results), nprocs=2, join=True)
        return dict(results)


def test_padding_steps_leave_batchnorm_statistics_alone(uneven_run):
    images, _ = _batches(0)[0]
    momentum = 0.1  # BatchNorm2d's default: running = (1 - m) * running + m * batch statistic
    expected_mean = momentum * images.mean(dim=(0, 2, 3))
    expected_var = (1 - momentum) + momentum * images.var(dim=(0, 2, 3), unbiased=True)
    got = uneven_run[0]
    assert got["tracked"] == 1
    torch.testing.assert_close(got["running_mean"], expected_mean)
    torch.testing.assert_close(got["running_var"], expected_var)


def test_all_ranks_make_the_same_steps_and_end_with_the_same_weights(uneven_run):
    r0, r1 = uneven_run[0], uneven_run[1]
    assert r0["steps"] == r1["steps"] == 4  # the longest rank's batches
    assert r0["samples"] == r1["samples"] == 2 + 32  # train-samples is over all ranks
    assert r0["adam_steps"] == r1["adam_steps"] == [4.0]
    torch.testing.assert_close(r0["params"], r1["params"], rtol=0, atol=0)
