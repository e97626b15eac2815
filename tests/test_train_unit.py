"""Training pieces that need no second process: flags, config checks, schedule, dataset, NaN guard."""

from __future__ import annotations


import pytest
import torch

from bincounter import search_space
from bincounter import train as tr
from bincounter.data import loader, shards


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_search_space_flags_are_training_flags():
    """Katib and optuna pass every searched parameter as a flag; each must parse into TrainConfig."""
    parser = tr.get_args_parser()
    values = {"lr": 0.003, "batch-size": 64, "optimizer": "sgd", "weight-decay": 1e-5, "dropout": 0.2}
    assert set(values) == {p.name for p in search_space.SEARCH_SPACE}
    args = parser.parse_args(["--data", "d", "--output", "o", *search_space.to_train_args(values)])
    cfg = tr.TrainConfig(**tr.train_kwargs(args))
    assert (cfg.lr, cfg.batch_size, cfg.optimizer, cfg.weight_decay, cfg.dropout) == (0.003, 64, "sgd", 1e-5, 0.2)


def test_cli_defaults_are_the_config_defaults():
    args = tr.get_args_parser().parse_args(["--data", "d", "--output", "o"])
    assert tr.TrainConfig(**tr.train_kwargs(args)) == tr.TrainConfig(data="d", output="o")
    assert "PER RANK" in tr.get_args_parser().format_help()


@pytest.mark.parametrize("kwargs, error, message", [
    ({"optimizer": "rmsprop"}, ValueError, "Only adamw, sgd are supported"),
    ({"arch": "vgg16"}, ValueError, "Only resnet18, resnet34, resnet50"),
    ({"learning_rate": 0.1}, TypeError, "Unknown training options \\['learning_rate'\\]"),
    ({"warmup_epochs": 10, "epochs": 10}, ValueError, "warmup_epochs"),
    ({"input_size": 32}, ValueError, "input_size"),
])
def test_bad_options_are_named(kwargs, error, message):
    with pytest.raises(error, match=message):
        tr.TrainConfig.from_kwargs({"data": "d", "output": "o", **kwargs})


def test_lr_schedule_warms_up_then_decays_to_zero():
    f = [tr.lr_factor(p, warmup_epochs=1, epochs=5) for p in (0, 0.5, 1, 3, 5)]
    assert f[0] < 0.01 and f[1] == pytest.approx(0.5, abs=0.01) and f[2] == 1.0
    assert f[3] == pytest.approx(0.5) and f[4] == pytest.approx(0.0)


def _labels(split_root, **kw):
    ds = loader.ShardDataset(shards.shard_uris(split_root, "val"), transform=lambda im: torch.zeros(1), **kw)
    return sorted(label for _, label in ds)


def test_dataset_drops_or_maps_counts_above_k(synthetic_split):
    counts = shards.read_manifest(synthetic_split)["splits"]["val"]["class_counts"]
    dropped = _labels(synthetic_split, max_count=2)
    mapped = _labels(synthetic_split, max_count=2, k_or_more=True)
    assert len(dropped) == sum(n for c, n in counts.items() if int(c) <= 2)
    assert len(mapped) == sum(counts.values())
    assert mapped.count(2) == sum(n for c, n in counts.items() if int(c) >= 2)


def test_dataset_ranks_and_workers_split_samples_without_overlap(synthetic_split):
    uris = shards.shard_uris(synthetic_split, "val")  # 2 shards: 3 ranks must split samples, not shards
    ids = []
    for rank in range(3):
        ds = loader.ShardDataset(uris, transform=None, max_count=99, rank=rank, world_size=3, shuffle_buffer=8)
        ds.set_epoch(1)
        ids += [s.id for s, _ in ds._samples(1, worker=0, num_workers=1)]
    everything = [s.id for uri in uris for s in shards.iter_shard(uri)]
    assert sorted(ids) == sorted(everything)


def test_nan_loss_stops_with_epoch_and_step(synthetic_split, tmp_path):
    # lr 1e30: the first step sends the weights to ~1e30, the next forward overflows to inf/NaN.
    with pytest.raises(FloatingPointError, match=r"Loss is (nan|inf) at epoch 1, step \d+"):
        tr.train(data=synthetic_split, output=str(tmp_path / "m"), arch="resnet18", input_size=64, resize_size=72,
                 epochs=1, warmup_epochs=0, lr=1e30, batch_size=8, workers=0, device="cpu")
    assert not (tmp_path / "m" / "config.json").exists()


def test_train_reads_and_writes_s3_with_profile(synthetic_split, s3_bucket, tmp_path):
    """Shards read from an s3:// prefix; model folder, checkpoint, metrics, TensorBoard and profiler
    trace written to one (moto server as the S3 endpoint). One process, one epoch, in-process."""
    from pathlib import Path

    from bincounter import model as model_lib
    from bincounter import storage

    data = f"s3://{s3_bucket}/split"
    for rel, _ in storage.list_files(synthetic_split):
        storage.upload_file(Path(synthetic_split, rel), storage.join(data, rel))
    out = f"s3://{s3_bucket}/runs/model"
    final = tr.train(data=data, output=out, arch="resnet18", input_size=64, epochs=1, warmup_epochs=0,
                     batch_size=16, workers=0, device="cpu", profile=True)
    assert final["epoch"] == 1
    assert final["train-samples"] == shards.read_manifest(synthetic_split)["splits"]["train"]["samples"]
    names = {rel for rel, _ in storage.list_files(out)}
    assert {"model.pt", "config.json", "metrics.json"} <= names
    assert storage.exists(f"{out}-checkpoints/checkpoint.pt")
    assert any(n.startswith("tensorboard/events.out.tfevents") for n in names), names
    assert any(n.startswith("profile/") and "rank0" in n for n in names), names
    net, cfg = model_lib.load_model_dir(out)
    assert cfg.metrics == final and cfg.train_args["data"] == data
