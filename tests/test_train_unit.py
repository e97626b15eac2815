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
    values = {p.name: (p.choices[-1] if p.kind == "categorical" else p.high) for p in search_space.SEARCH_SPACE}
    args = parser.parse_args(["--data", "d", "--output", "o", *search_space.to_train_args(values)])
    cfg = tr.TrainConfig(**tr.train_kwargs(args))
    for name, value in values.items():
        assert str(getattr(cfg, name.replace("-", "_"))) == str(value), name


def test_cli_defaults_are_the_config_defaults():
    args = tr.get_args_parser().parse_args(["--data", "d", "--output", "o"])
    assert tr.TrainConfig(**tr.train_kwargs(args)) == tr.TrainConfig(data="d", output="o")
    assert "PER RANK" in tr.get_args_parser().format_help()


@pytest.mark.parametrize("kwargs, error, message", [
    ({"optimizer": "rmsprop"}, ValueError, "Only adamw, sgd are supported"),
    ({"arch": "vgg16"}, ValueError, "Only resnet18, resnet34, resnet50, convnext_tiny, efficientnet_v2_s"),
    ({"learning_rate": 0.1}, TypeError, "Unknown training options \\['learning_rate'\\]"),
    ({"warmup_epochs": -1}, ValueError, "warmup_epochs"),
    ({"sync_bn": "yes"}, ValueError, "Invalid sync_bn 'yes'. Only auto, on, off"),
    ({"decoding": "mode"}, ValueError, "Only auto, argmax, median, expected"),
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
        tr.train(data=synthetic_split, output=str(tmp_path / "m"), arch="resnet18", pretrained="", input_size=64,
                 resize_size=72,
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
    final = tr.train(data=data, output=out, arch="resnet18", pretrained="", input_size=64, epochs=1, warmup_epochs=0,
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


def test_recipe_defaults_are_the_same_in_the_cli_the_components_and_the_pipeline():
    import inspect
    import sys
    from pathlib import Path

    from bincounter import presets
    from bincounter.data import split as split_lib

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    import components
    import pipeline

    cfg = tr.TrainConfig(data="d", output="o")
    assert (cfg.arch, cfg.pretrained, cfg.input_size, cfg.epochs) == ("resnet50", "imagenet", 384, 30)
    assert (cfg.optimizer, cfg.weight_decay, cfg.base_lr, cfg.label_smoothing, cfg.k_or_more) == (
        "adamw", 0.05, 5e-4, 0.1, True)
    defaults = {n: p.default for n, p in inspect.signature(pipeline.bincounter_pipeline.pipeline_func).parameters.items()}
    for name in ("arch", "pretrained", "input_size", "epochs", "k_or_more", "max_count"):
        assert defaults[name] == getattr(cfg, name), name
        for comp in (components.train, components.tune):
            params = inspect.signature(comp.python_func).parameters
            if name in params and name != "epochs":  # tune's epochs are per trial
                assert params[name].default == getattr(cfg, name), (comp.name, name)
    assert defaults["epochs"] == inspect.signature(components.train.python_func).parameters["epochs"].default
    short_sides = {defaults["short_side"], inspect.signature(components.split.python_func).parameters["short_side"].default,
                   inspect.signature(split_lib.split).parameters["short_side"].default}
    assert short_sides == {presets.SHORT_SIDE} and presets.SHORT_SIDE > presets.INPUT_SIZE == cfg.input_size


def test_submit_types_the_standard_split_parameters_from_pipeline_yaml():
    from bincounter import submit

    params = submit.parse_params(["train_ids=s3://b/counting_train.json", "val_ids=/data/counting_val.json",
                                  "k_or_more=false"], submit.pipeline_parameters(submit.DEFAULT_PIPELINE_FILE))
    assert params == {"train_ids": "s3://b/counting_train.json", "val_ids": "/data/counting_val.json",
                      "k_or_more": False}


def test_lr_scales_with_the_global_batch_and_warmup_fits_one_epoch():
    cfg = tr.TrainConfig(data="d", output="o", batch_size=32)
    assert cfg.peak_lr(world_size=8) == pytest.approx(5e-4)  # 256 images: base-lr itself
    assert cfg.peak_lr(world_size=2) == pytest.approx(5e-4 / 4)
    assert tr.TrainConfig(data="d", output="o", lr=0.01).peak_lr(world_size=8) == 0.01  # explicit lr wins
    assert tr.TrainConfig(data="d", output="o", epochs=1).warmup == 0.5  # --epochs 1 with the default warmup


def test_pretrained_file_formats_and_architecture_mismatch(tmp_path):
    from bincounter import model as model_lib
    import torchvision

    torch.manual_seed(1)
    reference = torchvision.models.resnet18(weights=None).state_dict()
    plain, wrapped = tmp_path / "plain.pth", tmp_path / "ddp.pth"
    torch.save(reference, plain)
    torch.save({"state_dict": {"module." + k: v for k, v in reference.items()}, "epoch": 3}, wrapped)
    for path in (plain, wrapped):
        net = model_lib.build_model("resnet18", 6, pretrained=str(path))
        torch.testing.assert_close(net.conv1.weight, reference["conv1.weight"])
        assert net.fc[1].out_features == 6
    with pytest.raises(ValueError, match="is a resnet18 state_dict, but the architecture is resnet34"):
        model_lib.build_model("resnet34", 6, pretrained=str(plain))
    torch.save({"conv.weight": torch.zeros(1)}, tmp_path / "other.pth")
    with pytest.raises(ValueError, match="not an ImageNet state_dict of any supported architecture"):
        model_lib.build_model("resnet18", 6, pretrained=str(tmp_path / "other.pth"))


@pytest.mark.parametrize("arch, head", [("convnext_tiny", "classifier.2.1"), ("efficientnet_v2_s", "classifier.1.1")])
def test_other_backbones_get_a_counting_head(arch, head):
    from bincounter import model as model_lib

    net = model_lib.build_model(arch, 4, dropout=0.2).eval()
    assert net.get_submodule(head).out_features == 4
    assert net(torch.zeros(2, 3, 64, 64)).shape == (2, 4)


def test_one_epoch_with_default_warmup_then_resume_refuses_changed_settings(synthetic_split, tmp_path):
    out = str(tmp_path / "m")
    small = dict(data=synthetic_split, output=out, arch="resnet18", pretrained="", input_size=64, epochs=1,
                 batch_size=32, workers=0, device="cpu", ema_epochs=0)
    final = tr.train(**small)  # --epochs 1 with the recipe's 2-epoch warmup: it is capped at half a run
    assert final["epoch"] == 1
    for changed in ({"input_size": 72}, {"dropout": 0.2}, {"label_smoothing": 0.0}):
        with pytest.raises(ValueError, match=f"other settings: {next(iter(changed))}="):
            tr.train(**{**small, **changed, "resume": True})
    again = tr.train(**{**small, "resume": True, "workers": 0, "print_freq": 7})  # operational: allowed
    assert again == final


def test_ordinal_head_gives_ordered_probabilities_and_round_trips(tmp_path):
    from bincounter import model as model_lib

    torch.manual_seed(0)
    head = model_lib.OrdinalHead(8, 6, dropout=0.0)
    with torch.no_grad():
        head.gaps.copy_(torch.randn(4))  # any values: softplus keeps the thresholds ordered
        log_probs = head(torch.randn(5, 8) * 3)
    probs = log_probs.exp()
    torch.testing.assert_close(probs.sum(dim=1), torch.ones(5))
    above = 1 - probs.cumsum(dim=1)[:, :-1]  # P(count > k)
    assert (above[:, 1:] <= above[:, :-1] + 1e-6).all()  # never crosses: rank-consistent
    # softmax of the output is the same distribution, so serving and evaluation need no special case
    torch.testing.assert_close(torch.softmax(log_probs, dim=1), probs)

    cfg = model_lib.ModelConfig(arch="resnet18", max_count=5, input_size=64, resize_size=64, head="ordinal")
    net = model_lib.build_model("resnet18", 6, head="ordinal").eval()
    model_lib.save_model_dir(net, cfg, str(tmp_path / "m"))
    loaded, loaded_cfg = model_lib.load_model_dir(tmp_path / "m")
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), net(x))
    assert loaded_cfg.head == "ordinal" and isinstance(loaded.fc, model_lib.OrdinalHead)
