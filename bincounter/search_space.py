"""The hyperparameter search space, defined once.

Katib's Experiment (``bincounter.k8s``) and the local optuna tuner
(``bincounter.engines.local``) are both generated from ``SEARCH_SPACE``, so the
two engines always search the same space. Each name is a training flag
(``--lr`` and so on) of ``bincounter train``.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

# Katib's StdOut collector and optuna both maximise this metric, printed by
# ``bincounter train`` each epoch as ``val-accuracy=0.55``.
OBJECTIVE_METRIC = "val-accuracy"
OBJECTIVE_GOAL = "maximize"
# Printed beside the objective so Katib records them too.
ADDITIONAL_METRICS = ("val-loss", "val-rmse", "train-loss")


@dataclasses.dataclass(frozen=True)
class Param:
    """One searched hyperparameter.

    kind is "double" (float range, optionally log scale), "int" (integer range)
    or "categorical" (a list of choices, kept as strings for Katib).
    """

    name: str
    kind: str
    low: float | None = None
    high: float | None = None
    log: bool = False
    choices: Sequence[Any] = ()

    def __post_init__(self):
        if self.kind not in ("double", "int", "categorical"):
            raise ValueError(f"Invalid kind {self.kind!r} for {self.name}. Only double, int and categorical are supported.")
        if self.kind == "categorical" and not self.choices:
            raise ValueError(f"Categorical parameter {self.name} needs choices")
        if self.kind != "categorical" and (self.low is None or self.high is None or self.low >= self.high):
            raise ValueError(f"Parameter {self.name} needs low < high, got {self.low}..{self.high}")

    @property
    def flag(self) -> str:
        return "--" + self.name

    def contains(self, value: Any) -> bool:
        if self.kind == "categorical":
            return str(value) in {str(c) for c in self.choices}
        return self.low <= float(value) <= self.high


# AdamW-centred (docs/training.md): the learning rate is per 256 images of global batch
# (``--base-lr``), so a value tuned on one trial GPU carries over to a training job of any
# size by the linear scaling rule, with nothing to convert. Ranges bracket the recipe's
# defaults (5e-4, 0.05, 0.1) by about 6x either way; decoupled decay below ~0.01 does nothing.
# Batch size is per rank; the optimizer is not searched (SGD needs other lr ranges).
SEARCH_SPACE: tuple[Param, ...] = (
    Param("base-lr", "double", low=1e-4, high=3e-3, log=True),
    Param("weight-decay", "double", low=0.01, high=0.3, log=True),
    Param("label-smoothing", "double", low=0.0, high=0.2),
    Param("dropout", "double", low=0.0, high=0.3),
    Param("batch-size", "categorical", choices=(16, 32, 64)),
)


def by_name(name: str) -> Param:
    for p in SEARCH_SPACE:
        if p.name == name:
            return p
    raise KeyError(f"Unknown hyperparameter {name!r}. Known: {', '.join(p.name for p in SEARCH_SPACE)}")


# Katib algorithms that log-transform every double (Katib's skopt suggestion service,
# pkg/suggestion/v1beta1/skopt/base_service.py, builds skopt Real(min, max, "log-uniform")):
# a double whose min is <= 0 gives log(0) and NaN suggestions.
LOG_TRANSFORMING_ALGORITHMS = ("bayesianoptimization",)


def check_algorithm(algorithm: str, space: Sequence[Param] = SEARCH_SPACE) -> None:
    """Raise when the algorithm cannot search this space (a double reaching 0 under a log transform)."""
    if algorithm in LOG_TRANSFORMING_ALGORITHMS:
        bad = [p.name for p in space if p.kind == "double" and p.low <= 0]
        if bad:
            raise ValueError(f"Katib's {algorithm} log-transforms every double parameter; "
                             f"{', '.join(bad)} has min <= 0 (log gives NaN). Use tpe or random.")


def to_katib_parameters(space: Sequence[Param] = SEARCH_SPACE) -> list[dict]:
    """Katib ``spec.parameters`` entries (kubeflow.org/v1beta1 ParameterSpec)."""
    out = []
    for p in space:
        if p.kind == "categorical":
            out.append({"name": p.name, "parameterType": "categorical",
                        "feasibleSpace": {"list": [str(c) for c in p.choices]}})
        else:
            feasible = {"min": _fmt(p.low), "max": _fmt(p.high)}
            if p.log:
                feasible["distribution"] = "logUniform"
            out.append({"name": p.name, "parameterType": p.kind, "feasibleSpace": feasible})
    return out


def suggest_optuna(trial, space: Sequence[Param] = SEARCH_SPACE) -> dict[str, Any]:
    """Ask an ``optuna.Trial`` for one value of every parameter."""
    values: dict[str, Any] = {}
    for p in space:
        if p.kind == "categorical":
            values[p.name] = trial.suggest_categorical(p.name, list(p.choices))
        elif p.kind == "int":
            values[p.name] = trial.suggest_int(p.name, int(p.low), int(p.high), log=p.log)
        else:
            values[p.name] = trial.suggest_float(p.name, p.low, p.high, log=p.log)
    return values


def to_train_args(values: dict[str, Any]) -> list[str]:
    """Turn ``{"lr": 0.001, ...}`` into ``["--lr", "0.001", ...]`` for ``bincounter train``."""
    args: list[str] = []
    for name, value in values.items():
        by_name(name)  # reject unknown names instead of passing them on silently
        args += ["--" + name, str(value)]
    return args


def _fmt(x: float) -> str:
    # Katib takes feasible-space bounds as strings; repr gives "0.0001", "1e-06".
    return repr(float(x))
