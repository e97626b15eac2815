"""Engines: where the heavy stages run.

The KFP components (``components/``) call one engine per run, chosen by the
pipeline's ``engine`` parameter:

- ``local`` (``bincounter.engines.local``): training as a real ``torchrun``
  process on this machine, tuning with optuna over the shared search space, the
  KServe model server as a local process. Needs nothing but this package.
- ``kubernetes`` (``bincounter.engines.kubernetes``): a PyTorchJob/TrainJob, a
  Katib Experiment and an InferenceService through the launchers in
  ``bincounter.k8s``.

Both return the same result types (``TrainResult``, ``TuneResult``,
``Deployment``), so a component reads the same fields whichever engine ran.
"""

from __future__ import annotations

import dataclasses
from typing import Any

ENGINES = ("kubernetes", "local")


def check_engine(name: str) -> str:
    if name not in ENGINES:
        raise ValueError(f"Invalid engine {name!r}. Only {', '.join(ENGINES)} are supported.")
    return name


@dataclasses.dataclass
class TrainResult:
    """What a training run leaves for the next step."""

    model_uri: str
    # The last epoch's metrics as printed by the trainer (val-accuracy, val-loss, ...).
    metrics: dict[str, float]
    seconds: float
    # Accelerator time this run held (0 on CPU): wall time x workers x GPUs per worker.
    gpu_hours: float = 0.0


@dataclasses.dataclass
class TuneResult:
    """The best hyperparameters of a search, and what the search cost."""

    best_params: dict[str, Any]
    best_value: float
    trials: list[dict[str, Any]]
    seconds: float
    gpu_hours: float = 0.0


@dataclasses.dataclass
class Deployment:
    """A served model: where to send requests, and how to find it again to stop it."""

    url: str
    model_name: str
    # Engine-specific handle: a process id for ``local``, the InferenceService name for ``kubernetes``.
    handle: str
    details: dict[str, Any] = dataclasses.field(default_factory=dict)
