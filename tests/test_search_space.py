"""The search space is defined once and rendered for Katib and optuna."""

import optuna
import pytest

from bincounter import search_space as ss


def test_katib_parameters_cover_every_param_with_katib_types():
    params = {p["name"]: p for p in ss.to_katib_parameters()}
    assert list(params) == [p.name for p in ss.SEARCH_SPACE]
    assert params["base-lr"] == {"name": "base-lr", "parameterType": "double",
                                 "feasibleSpace": {"min": "0.0001", "max": "0.003", "distribution": "logUniform"}}
    assert params["batch-size"]["feasibleSpace"]["list"] == ["16", "32", "64"]
    # Katib wants every bound and choice as a string.
    for p in params.values():
        for value in p["feasibleSpace"].values():
            assert isinstance(value, (str, list))


def test_optuna_samples_stay_inside_the_space():
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    for _ in range(30):
        trial = study.ask()
        values = ss.suggest_optuna(trial)
        assert set(values) == {p.name for p in ss.SEARCH_SPACE}
        for name, value in values.items():
            assert ss.by_name(name).contains(value), (name, value)
        study.tell(trial, 0.0)


def test_train_args_use_the_training_flags_and_reject_unknown_names():
    assert ss.to_train_args({"base-lr": 0.001, "batch-size": 16}) == ["--base-lr", "0.001", "--batch-size", "16"]
    with pytest.raises(KeyError, match="Unknown hyperparameter 'learning_rate'"):
        ss.to_train_args({"learning_rate": 0.1})


def test_invalid_param_definitions_are_rejected():
    with pytest.raises(ValueError, match="low < high"):
        ss.Param("lr", "double", low=1.0, high=0.1)
    with pytest.raises(ValueError, match="Invalid kind"):
        ss.Param("x", "float", low=0, high=1)
