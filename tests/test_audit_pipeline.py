"""The audit pipeline: audit_pipeline.yaml without drift, its parameters, the training pipeline's
optional audit of its test split, and the audit pipeline run for real through kfp.local with
engine=local (the same component a cluster runs, its parts as local processes)."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

import audit_pipeline
import pipeline

REPO = Path(__file__).resolve().parents[1]


def test_checked_in_audit_pipeline_yaml_matches_the_code(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("BINCOUNTER_REGISTRY", "BINCOUNTER_TAG")}
    out = tmp_path / "audit_pipeline.yaml"
    subprocess.run([sys.executable, str(REPO / "audit_pipeline.py"), "--output", str(out)], env=env, check=True,
                   capture_output=True, timeout=120)
    assert out.read_text() == audit_pipeline.PIPELINE_FILE.read_text(), (
        "audit_pipeline.yaml is out of date: run `python audit_pipeline.py` and commit it")


def test_audit_pipeline_parameters_and_outputs():
    spec, platform = yaml.safe_load_all(audit_pipeline.PIPELINE_FILE.read_text())
    params = spec["root"]["inputDefinitions"]["parameters"]
    assert {"model_uri", "source", "threshold", "workers"} <= set(params)
    assert "defaultValue" not in params["model_uri"]  # the one thing a user must give
    outputs = spec["components"]["comp-audit"]["outputDefinitions"]["artifacts"]
    assert outputs["report"]["artifactType"]["schemaTitle"] == "system.HTML"
    assert outputs["report_markdown"]["artifactType"]["schemaTitle"] == "system.Markdown"
    assert outputs["table"]["artifactType"]["schemaTitle"] == "system.Artifact"
    # The S3 Secret reaches the audit step, as in the training pipeline.
    secrets = platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]["exec-audit"]["secretAsEnv"]
    assert {k["secretKey"] for s in secrets for k in s["keyToEnv"]} >= {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"}


def test_training_pipeline_audits_its_test_split_only_when_asked():
    spec, _ = yaml.safe_load_all(pipeline.PIPELINE_FILE.read_text())
    assert spec["root"]["inputDefinitions"]["parameters"]["audit_test"]["defaultValue"] is False
    dags = {name: c["dag"]["tasks"] for name, c in spec["components"].items() if "dag" in c}
    (cond_name, inner), = [(n, t) for n, t in dags.items() if "audit-test-split" in t]
    artifacts = inner["audit-test-split"]["inputs"]["artifacts"]
    assert artifacts["model"]["componentInputArtifact"] == "pipelinechannel--train-model"
    assert artifacts["shards"]["componentInputArtifact"] == "pipelinechannel--split-shards"
    (gate,) = [t for t in dags["comp-exit-handler-1"].values() if t["componentRef"]["name"] == cond_name]
    assert "audit_test'] == true" in gate["triggerPolicy"]["condition"]
    assert "evaluate" in gate["dependentTasks"]  # the audit uses an evaluated model


@pytest.mark.usefixtures("one_torch_thread")
def test_audit_pipeline_runs_locally_with_the_local_engine(sample_dir, tmp_path, monkeypatch):
    import shutil

    from kfp import local

    from bincounter import model as model_lib
    from bincounter.demo import task_outputs

    import torch

    torch.manual_seed(0)
    cfg = model_lib.ModelConfig(arch="resnet18", max_count=5, k_or_more=True, input_size=32, resize_size=36)
    model_lib.save_model_dir(model_lib.build_model("resnet18", 6), cfg, str(tmp_path / "model"))
    src = tmp_path / "abid"
    for sub in ("bin-images", "metadata"):
        (src / sub).mkdir(parents=True)
    ids = sorted(p.stem for p in sample_dir.glob("000*.jpg"))[:8]
    for i in ids:
        shutil.copy(sample_dir / f"{i}.jpg", src / "bin-images" / f"{i}.jpg")
        shutil.copy(sample_dir / f"{i}.json", src / "metadata" / f"{i}.json")
    monkeypatch.setenv("BINCOUNTER_STATE_DIR", str(tmp_path / "state"))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    root = tmp_path / "root"
    root.mkdir()
    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(root), raise_on_error=True)
    audit_pipeline.audit_pipeline(model_uri=str(tmp_path / "model"), source=str(src), workers=2, engine="local",
                                  work_uri=str(tmp_path / "work"), threshold=0.5, inject_discrepancies=0.5,
                                  seed=2)
    (run,) = [p for p in root.iterdir() if p.is_dir()]
    out = task_outputs(run)["audit"]
    assert out["parameterValues"] == {"flagged": out["parameterValues"]["flagged"], "bins": 8}
    table = Path(out["artifacts"]["table"]["artifacts"][0]["uri"].removeprefix("file://"))
    if not table.exists():  # kfp.local keeps artifacts under the pipeline root
        table = next(root.rglob("table"))
    rows = list(csv.DictReader(open(table / "audit.csv")))
    assert [r["id"] for r in rows] == ids
    assert out["parameterValues"]["flagged"] == sum(r["flagged"] == "true" for r in rows)
    metrics = out["artifacts"]["metrics"]["artifacts"][0]["metadata"]
    assert metrics["bins"] == 8 and "precision" in metrics and "auroc" in metrics
    html = next(root.rglob("report"))
    assert "<h1>Inventory audit</h1>" in html.read_text()
    # Both parts scored their own chunks (--part 0 and 1 of 2) into the working store.
    chunks = sorted((tmp_path / "work" / "audit").rglob("chunk-*.json"))
    assert len(chunks) == 1  # 8 bins < one chunk of 512: part 1 had nothing to do
