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

import argparse
import dataclasses
from typing import Any, Sequence

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


def training_args(*, arch: str, max_count: int, input_size: int, epochs: int, pretrained: str = "",
                  extra: Sequence[str] = ()) -> list[str]:
    """The ``bincounter train`` flags a pipeline run fixes for tuning trials and the final training.

    The trainer resizes each whole image to ``input_size`` (no crop: a crop can cut
    items off and change the count). ``extra`` is passed through after a check against the trainer's own parser,
    so a misspelled flag fails here, before any job starts.
    """
    # --pretrained always goes along: "" means from scratch, and the trainer's own default
    # ("imagenet", a download) must not stand in for it.
    args = ["--arch", arch, "--max-count", str(max_count), "--input-size", str(input_size),
            "--epochs", str(epochs), "--pretrained", pretrained]
    args += [str(a) for a in extra]
    check_train_args(args)
    return args


def check_train_args(args: Sequence[str]) -> None:
    """Raise ``ValueError`` naming the problem if ``bincounter train`` would reject ``args``."""
    import contextlib
    import io

    from bincounter.train import TrainConfig, get_args_parser, train_kwargs

    parser = get_args_parser(add_help=False)
    parser.exit_on_error = False
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            parsed, unknown = parser.parse_known_args(["--data", "-", "--output", "-", *args])
    except (argparse.ArgumentError, SystemExit) as e:
        why = err.getvalue().strip().splitlines()[-1:] or [str(e)]
        raise ValueError(f"Invalid training arguments {list(args)}: {why[0]}") from None
    if unknown:
        raise ValueError(f"Unknown training arguments {unknown}; see `bincounter train --help`.")
    try:  # the trainer's own checks of combinations (warmup shorter than training, ...)
        TrainConfig.from_kwargs(train_kwargs(parsed))
    except (TypeError, ValueError) as e:
        raise ValueError(f"Invalid training arguments {list(args)}: {e}") from None


def local_processes(workers: int, gpus_per_worker: int) -> int:
    """Processes a local run starts for a cluster shape: one per GPU of every worker (one per
    worker on CPU), so the world size -- and with it the global batch -- matches the cluster's."""
    if workers < 1 or gpus_per_worker < 0:
        raise ValueError(f"Need workers >= 1 and gpus_per_worker >= 0, got {workers} and {gpus_per_worker}")
    return workers * max(1, gpus_per_worker)


def normalize_params(values: dict[str, Any]) -> dict[str, Any]:
    """Hyperparameters back in their search-space types after a trip through KFP or Katib.

    KFP passes a dict as a protobuf Struct (every number becomes a float: 16 -> 16.0)
    and Katib reports every value as a string ("16"); ``bincounter train`` wants
    ``--batch-size 16``. Unknown names raise, naming the known ones.
    """
    from bincounter import search_space

    out: dict[str, Any] = {}
    for name, value in values.items():
        param = search_space.by_name(name)
        if param.kind == "categorical":
            matches = [c for c in param.choices if str(c) == str(value) or _same_number(c, value)]
            if not matches:
                raise ValueError(f"Invalid value {value!r} for {name}. Choices: {list(param.choices)}")
            out[name] = matches[0]
        elif param.kind == "int":
            out[name] = int(float(value))
        else:
            out[name] = float(value)
    return out


def _same_number(a: Any, b: Any) -> bool:
    try:
        return float(a) == float(b)
    except (TypeError, ValueError):
        return False

