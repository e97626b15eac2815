"""One vocabulary (issue 14): renamed flags keep their old spelling for one release, with a warning."""

from __future__ import annotations

import pytest

from bincounter import cli


def test_old_spellings_still_work_with_a_warning(tmp_path, synthetic_abid, capsys):
    dest = tmp_path / "dl"
    assert cli.main(["download", "--source", synthetic_abid, "--dest", str(dest), "--workers", "2",
                     "--limit", "3", "--no-progress"]) == 0
    err = capsys.readouterr().err
    assert "warning: --dest is deprecated" in err and "use --output" in err
    assert "warning: --workers is deprecated" in err and "use --concurrency" in err
    assert (dest / "manifest.json").is_file()


def test_new_names_and_help(capsys):
    with pytest.raises(SystemExit):
        cli.main(["download", "--help"])
    out = capsys.readouterr().out
    assert "--output OUTPUT" in out and "--concurrency" in out
    assert "--dest" not in out and "--output-endpoint-url" in out  # deprecated spellings are hidden
    with pytest.raises(SystemExit) as e:
        cli.main(["download", "--source", "x"])
    assert e.value.code == 2
    assert "required: --output" in capsys.readouterr().err


def test_training_flags_renamed_everywhere_they_are_parsed():
    from bincounter.engines import check_train_args

    check_train_args(["--loader-workers", "0"])
    check_train_args(["--workers", "0"])  # the deprecated spelling, still valid for one release
    with pytest.raises(ValueError, match="--loader-work"):
        check_train_args(["--loader-work", "0"])  # and no abbreviations


def test_k8s_tune_counts_trials_like_the_local_tuner(capsys):
    with pytest.raises(SystemExit):
        cli.main(["k8s", "tune", "--help"])
    out = capsys.readouterr().out
    assert "--trials TRIALS" in out and "--parallelism PARALLELISM" in out and "--max-trials" not in out


def test_help_shows_where_the_pipeline_default_differs(capsys):
    from bincounter.submit import DEFAULT_PIPELINE_FILE, pipeline_parameters

    declared = pipeline_parameters(DEFAULT_PIPELINE_FILE)
    for (command, dest), (param, default) in cli.PIPELINE_DEFAULTS.items():
        assert declared[param]["default"] == default, (command, param)  # the table follows pipeline.yaml
    with pytest.raises(SystemExit):
        cli.main(["download", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "[the pipeline's download_concurrency defaults to 32]" in out
    with pytest.raises(SystemExit):
        cli.main(["train", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "[the pipeline's" not in out  # the recipe's defaults are the pipeline's (docs/training.md)
