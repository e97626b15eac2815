"""The counting model and its folder format.

A model folder holds exactly what serving needs:

- ``model.pt``: the ``state_dict`` of the network (loaded with ``weights_only=True``);
- ``config.json``: architecture, classes, input size, normalisation, the training
  arguments and final metrics (see ``ModelConfig``).

Training writes it with ``save_model_dir``; serving, evaluation and the pipeline
read it with ``load_model_dir``.
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
from typing import Any

import torch
import torchvision
from torch import nn

from bincounter import storage

ARCHITECTURES = ("resnet18", "resnet34", "resnet50")
WEIGHTS_FILE = "model.pt"
CONFIG_FILE = "config.json"
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclasses.dataclass
class ModelConfig:
    arch: str = "resnet50"
    max_count: int = 5
    # True: the last class means "max_count or more"; False: bins above max_count were dropped.
    k_or_more: bool = False
    input_size: int = 224
    # Eval transform: resize the whole image to resize_size x resize_size, then centre-crop input_size.
    resize_size: int = 224
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD
    dropout: float = 0.0
    version: str = "1"
    # Softmax temperature fitted on the validation split at the end of training (bincounter.calibration);
    # serving, evaluation and the audit divide the logits by it. 1.0: uncalibrated.
    temperature: float = 1.0
    calibration: dict[str, Any] = dataclasses.field(default_factory=dict)  # ECE/NLL before and after, per bin
    # The audit flags a bin when P(expected quantity) < this (bincounter audit, serving's expected_quantity).
    audit_threshold: float = 0.1
    train_args: dict[str, Any] = dataclasses.field(default_factory=dict)
    metrics: dict[str, Any] = dataclasses.field(default_factory=dict)

    @property
    def num_classes(self) -> int:
        return self.max_count + 1

    @property
    def class_names(self) -> list[str]:
        names = [str(i) for i in range(self.num_classes)]
        if self.k_or_more:
            names[-1] += "+"
        return names

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ModelConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"Unknown keys in {CONFIG_FILE}: {unknown}. Known keys: {sorted(known)}")
        cfg = cls(**data)
        if cfg.arch not in ARCHITECTURES:
            raise ValueError(f"Invalid arch {cfg.arch!r} in {CONFIG_FILE}. Only {', '.join(ARCHITECTURES)} are supported.")
        cfg.mean, cfg.std = tuple(cfg.mean), tuple(cfg.std)
        if not (isinstance(cfg.temperature, (int, float)) and cfg.temperature > 0):
            raise ValueError(f"Invalid temperature {cfg.temperature!r} in {CONFIG_FILE}: must be a number > 0.")
        return cfg


def build_model(arch: str, num_classes: int, dropout: float = 0.0, pretrained: str | None = None) -> nn.Module:
    """A torchvision ResNet with a new head: dropout, then a linear layer over ``num_classes`` counts.

    ``pretrained`` is a local path or ``s3://`` URI of an ImageNet ``state_dict``
    (e.g. torchvision's ``resnet50-11ad3fa6.pth``), or ``"imagenet"`` to use
    torchvision's download (needs the internet). ``None`` starts from scratch.
    """
    if arch not in ARCHITECTURES:
        raise ValueError(f"Invalid architecture {arch!r}. Only {', '.join(ARCHITECTURES)} are supported.")
    factory = getattr(torchvision.models, arch)
    if pretrained == "imagenet":
        model = factory(weights="IMAGENET1K_V1")
    else:
        model = factory(weights=None)
        if pretrained:
            state = torch.load(io.BytesIO(storage.read_bytes(pretrained)), map_location="cpu", weights_only=True)
            model.load_state_dict(state)
    model.fc = nn.Sequential(nn.Dropout(p=dropout), nn.Linear(model.fc.in_features, num_classes))
    return model


def save_model_dir(model: nn.Module, config: ModelConfig, dest: str) -> None:
    """Write ``model.pt`` then ``config.json`` (local folder or ``s3://`` prefix).

    The config is written last, so a folder with a config always has its weights.
    """
    model = getattr(model, "module", model)  # unwrap DDP
    model = getattr(model, "_orig_mod", model)  # unwrap torch.compile
    buf = io.BytesIO()
    torch.save({k: v.detach().cpu() for k, v in model.state_dict().items()}, buf)
    storage.write_bytes(storage.join(dest, WEIGHTS_FILE), buf.getvalue())
    storage.write_bytes(storage.join(dest, CONFIG_FILE), config.to_json().encode())


def load_config(src: str) -> ModelConfig:
    config_uri = storage.join(src, CONFIG_FILE)
    if not storage.exists(config_uri):
        raise FileNotFoundError(
            f"No {CONFIG_FILE} in model folder {src}. Point at the folder written by `bincounter train --output`.")
    return ModelConfig.from_dict(json.loads(storage.read_bytes(config_uri)))


def load_model_dir(src: str | os.PathLike, device: str | torch.device = "cpu") -> tuple[nn.Module, ModelConfig]:
    """Load a model folder for inference: the network in eval mode on ``device``, and its config."""
    src = str(src)
    config = load_config(src)
    weights_uri = storage.join(src, WEIGHTS_FILE)
    if not storage.exists(weights_uri):
        raise FileNotFoundError(f"No {WEIGHTS_FILE} in model folder {src}; the folder is incomplete.")
    model = build_model(config.arch, config.num_classes, config.dropout)
    state = torch.load(io.BytesIO(storage.read_bytes(weights_uri)), map_location="cpu", weights_only=True)
    model.load_state_dict(state)
    return model.to(device).eval(), config
