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
import math
import os
import time
import uuid
from typing import Any

import torch
import torchvision
from torch import nn

from bincounter import errors, storage

ARCHITECTURES = ("resnet18", "resnet34", "resnet50", "convnext_tiny", "efficientnet_v2_s")
# How class probabilities become one count (``decode``); training picks one on validation.
DECODINGS = ("argmax", "median", "expected")
# The counting head: "softmax" (K+1 independent logits) or "ordinal" (``OrdinalHead``).
HEADS = ("softmax", "ordinal")
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
    head: str = "softmax"
    # The decoding chosen on validation (``decode``); "argmax" for folders written before it existed.
    decoding: str = "argmax"
    # Which weights model.pt holds: {"source": "model" | "ema", "epoch": N, "val-accuracy": ...}.
    checkpoint: dict[str, Any] = dataclasses.field(default_factory=dict)
    # The training run that wrote the folder (what serving reports as model_version); save_model_dir
    # fills it in. Folders written before this field existed load with "".
    version: str = ""
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
        if cfg.head not in HEADS:
            raise ValueError(f"Invalid head {cfg.head!r} in {CONFIG_FILE}. Only {', '.join(HEADS)} are supported.")
        if cfg.decoding not in DECODINGS:
            raise ValueError(f"Invalid decoding {cfg.decoding!r} in {CONFIG_FILE}. Only {', '.join(DECODINGS)} are supported.")
        cfg.mean, cfg.std = tuple(cfg.mean), tuple(cfg.std)
        if not (isinstance(cfg.temperature, (int, float)) and cfg.temperature > 0):
            raise ValueError(f"Invalid temperature {cfg.temperature!r} in {CONFIG_FILE}: must be a number > 0.")
        return cfg


def decode(probs: torch.Tensor, method: str = "argmax") -> torch.Tensor:
    """Counts (int64, shape ``[N]``) from class probabilities ``[N, K+1]`` (rows sum to 1).

    - ``argmax``: the most likely count (best accuracy);
    - ``median``: the median of the predicted distribution, the count that minimises the expected
      absolute error; it rarely jumps far on an uncertain bin, which lowers RMSE;
    - ``expected``: the rounded expected count sum_k k * p_k (minimises squared error before rounding).

    Serving, audit and evaluation call this with the ``decoding`` of the model's config.json.
    """
    if method == "argmax":
        return probs.argmax(dim=1)
    if method == "median":
        # The first count whose cumulative probability reaches 1/2 (clamped: float rounding).
        below = (probs.cumsum(dim=1) < 0.5).sum(dim=1)
        return below.clamp(max=probs.shape[1] - 1)
    if method == "expected":
        counts = torch.arange(probs.shape[1], dtype=probs.dtype, device=probs.device)
        return (probs * counts).sum(dim=1).round().long()
    raise ValueError(f"Invalid decoding {method!r}. Only {', '.join(DECODINGS)} are supported.")


class OrdinalHead(nn.Module):
    """An ordinal counting head: a cumulative-logit (proportional-odds) model, as CORAL's
    rank-consistent form (Cao et al. 2020): one score per image, K ordered thresholds,
    P(count > k) = sigmoid(score + t_k) with t_0 > t_1 > ... (so the probabilities never cross).

    ``forward`` returns log class probabilities, so ``softmax`` of the output gives the class
    probabilities and cross-entropy is the model's likelihood: training, evaluation, serving
    and audit use it exactly as the softmax head, with no special case.
    """

    def __init__(self, features: int, num_classes: int, dropout: float = 0.0):
        super().__init__()
        if num_classes < 2:
            raise ValueError(f"An ordinal head needs at least 2 classes, got {num_classes}")
        self.dropout = nn.Dropout(p=dropout)
        self.score = nn.Linear(features, 1)
        # Thresholds start one logit apart around 0; gaps pass through softplus to stay > 0.
        self.first = nn.Parameter(torch.tensor([(num_classes - 2) / 2.0]))
        self.gaps = nn.Parameter(torch.full((num_classes - 2,), math.log(math.e - 1)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.score(self.dropout(x)).float()  # fp32 even under autocast: differences of sigmoids
        thresholds = torch.cat([self.first, self.first - torch.cumsum(nn.functional.softplus(self.gaps), 0)])
        above = torch.sigmoid(z + thresholds)  # [N, K]: P(count > k), decreasing in k
        cum = torch.cat([torch.ones_like(z), above, torch.zeros_like(z)], dim=1)
        return torch.log((cum[:, :-1] - cum[:, 1:]).clamp_min(1e-12))


def _head(model: nn.Module, arch: str) -> tuple[nn.Module, str, int]:
    """(module holding the ImageNet classifier, attribute name, input features) per family."""
    if arch.startswith("resnet"):
        return model, "fc", model.fc.in_features
    if arch.startswith("convnext"):  # classifier = LayerNorm2d, Flatten, Linear
        return model.classifier, "2", model.classifier[2].in_features
    return model.classifier, "1", model.classifier[1].in_features  # efficientnet: Dropout, Linear


def read_state_dict(uri: str) -> dict[str, torch.Tensor]:
    """A ``state_dict`` from a weights file: plain, ``{"state_dict": ...}`` / ``{"model": ...}``
    (training scripts' checkpoints), keys with DDP's ``module.`` prefix stripped."""
    state = torch.load(io.BytesIO(storage.read_bytes(uri)), map_location="cpu", weights_only=True)
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"Weights file {uri} holds no state_dict (a dict of tensors)")
    prefix = "module."
    if state and all(k.startswith(prefix) for k in state):
        state = {k[len(prefix):]: v for k, v in state.items()}
    return state


def _arch_of(state: dict[str, torch.Tensor]) -> str | None:
    """The torchvision architecture whose ImageNet model has exactly these keys and shapes."""
    shapes = {k: tuple(v.shape) for k, v in state.items()}
    for arch in ARCHITECTURES:
        ref = getattr(torchvision.models, arch)(weights=None).state_dict()
        if shapes == {k: tuple(v.shape) for k, v in ref.items()}:
            return arch
    return None


def build_model(arch: str, num_classes: int, dropout: float = 0.0, pretrained: str | None = None,
                head: str = "softmax") -> nn.Module:
    """A torchvision network with its ImageNet classifier replaced: dropout, then a linear layer
    over ``num_classes`` counts (ResNet: ``fc``; ConvNeXt and EfficientNet: the classifier's last layer).

    ``pretrained`` is ``"imagenet"`` for torchvision's current best ImageNet weights (``DEFAULT``:
    IMAGENET1K_V2 for ResNet-50, downloaded once into the torch hub cache; needs the internet),
    or a local path / ``s3://`` URI of an ImageNet ``state_dict`` of the same architecture
    (``read_state_dict`` formats). ``None`` starts from scratch. ``head``: ``HEADS``.
    """
    if head not in HEADS:
        raise ValueError(f"Invalid head {head!r}. Only {', '.join(HEADS)} are supported.")
    if arch not in ARCHITECTURES:
        raise ValueError(f"Invalid architecture {arch!r}. Only {', '.join(ARCHITECTURES)} are supported.")
    factory = getattr(torchvision.models, arch)
    if pretrained == "imagenet":
        model = factory(weights="DEFAULT")
    else:
        model = factory(weights=None)
        if pretrained:
            state = read_state_dict(pretrained)
            try:
                model.load_state_dict(state)
            except RuntimeError:
                found = _arch_of(state)
                what = f"a {found} state_dict" if found else "not an ImageNet state_dict of any supported architecture"
                raise ValueError(f"Weights file {pretrained} is {what}, but the architecture is {arch}. "
                                 f"Pass --arch {found} or weights for {arch}." if found else
                                 f"Weights file {pretrained} is {what}; the architecture is {arch}.") from None
    parent, name, features = _head(model, arch)
    if head == "ordinal":
        setattr(parent, name, OrdinalHead(features, num_classes, dropout))
    else:
        setattr(parent, name, nn.Sequential(nn.Dropout(p=dropout), nn.Linear(features, num_classes)))
    return model


def save_model_dir(model: nn.Module, config: ModelConfig, dest: str) -> None:
    """Write ``model.pt`` then ``config.json`` (local folder or ``s3://`` prefix).

    The config is written last, so a folder with a config always has its weights.
    """
    if not config.version:
        config = dataclasses.replace(config, version=run_id())
    model = getattr(model, "module", model)  # unwrap DDP
    model = getattr(model, "_orig_mod", model)  # unwrap torch.compile
    buf = io.BytesIO()
    torch.save({k: v.detach().cpu() for k, v in model.state_dict().items()}, buf)
    storage.write_bytes(storage.join(dest, WEIGHTS_FILE), buf.getvalue())
    storage.write_bytes(storage.join(dest, CONFIG_FILE), config.to_json().encode())


def run_id() -> str:
    """This run's id: ``$BINCOUNTER_RUN_ID`` (e.g. the KFP run), else a new UTC-timestamped one."""
    generated = f"{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}-{uuid.uuid4().hex[:8]}"
    return os.environ.get("BINCOUNTER_RUN_ID") or generated


def load_config(src: str) -> ModelConfig:
    config_uri = storage.join(src, CONFIG_FILE)
    if not storage.exists(config_uri):
        raise FileNotFoundError(
            f"No {CONFIG_FILE} in model folder {src}. Point at the folder written by `bincounter train --output`.")
    return ModelConfig.from_dict(storage.read_json(config_uri, what="model config"))


def load_model_dir(src: str | os.PathLike, device: str | torch.device = "cpu") -> tuple[nn.Module, ModelConfig]:
    """Load a model folder for inference: the network in eval mode on ``device``, and its config."""
    src = str(src)
    config = load_config(src)
    weights_uri = storage.join(src, WEIGHTS_FILE)
    if not storage.exists(weights_uri):
        raise FileNotFoundError(f"No {WEIGHTS_FILE} in model folder {src}; the folder is incomplete.")
    model = build_model(config.arch, config.num_classes, config.dropout, head=config.head)
    with errors.about_file(weights_uri, "model weights"):
        state = torch.load(io.BytesIO(storage.read_bytes(weights_uri)), map_location="cpu", weights_only=True)
        model.load_state_dict(state)
    return model.to(device).eval(), config
