"""The compiled pipeline: drift against the code, KFP's protobuf schema, and its wiring."""

from __future__ import annotations

import inspect
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from google.protobuf import json_format
from kfp.kubernetes import kubernetes_executor_config_pb2
from kfp.pipeline_spec import pipeline_spec_pb2

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import components  # noqa: E402
import pipeline  # noqa: E402
from bincounter import images  # noqa: E402

STAGES = ("download", "split", "tune", "train", "evaluate", "deploy")


@pytest.fixture(scope="module")
def docs() -> tuple[dict, dict]:
    spec, platform = yaml.safe_load_all(pipeline.PIPELINE_FILE.read_text())
    return spec, platform


def test_checked_in_pipeline_yaml_matches_the_code(tmp_path):
    # `python pipeline.py` exactly as a developer runs it, with the default image registry and tag
    # (BINCOUNTER_REGISTRY/TAG in the environment would legitimately change the images).
    env = {k: v for k, v in os.environ.items() if k not in ("BINCOUNTER_REGISTRY", "BINCOUNTER_TAG")}
    out = tmp_path / "pipeline.yaml"
    subprocess.run([sys.executable, str(REPO / "pipeline.py"), "--output", str(out)], env=env, check=True,
                   capture_output=True, timeout=120)
    assert out.read_text() == pipeline.PIPELINE_FILE.read_text(), (
        "pipeline.yaml is out of date with pipeline.py/components: run `python pipeline.py` and commit it")


def test_compiled_pipeline_loads_into_kfp_protobufs(docs):
    spec, platform = docs
    msg = json_format.ParseDict(spec, pipeline_spec_pb2.PipelineSpec())  # raises on unknown fields
    assert msg.pipeline_info.name == "bincounter"
    platform_msg = json_format.ParseDict(platform, pipeline_spec_pb2.PlatformSpec())
    executors = platform_msg.platforms["kubernetes"].deployment_spec.executors  # name -> Struct
    for stage in STAGES:
        config = json_format.ParseDict(json_format.MessageToDict(executors[f"exec-{stage}"]),
                                       kubernetes_executor_config_pb2.KubernetesExecutorConfig())
        # S3 credentials from the Secret named by the s3_secret parameter, endpoint/region optional.
        assert [s.optional for s in config.secret_as_env] == [False, True]
        assert {k.env_var for s in config.secret_as_env for k in s.key_to_env} == {
            "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT_URL", "AWS_DEFAULT_REGION"}
        assert config.secret_as_env[0].secret_name_parameter.component_input_parameter.endswith("s3_secret")
        assert config.node_selector.node_selector_json.component_input_parameter.endswith("step_node_selector")
        assert config.tolerations[0].toleration_json.component_input_parameter.endswith("step_tolerations")


def test_every_step_runs_in_the_pipeline_image(docs):
    spec, _ = docs
    executors = spec["deploymentSpec"]["executors"]
    assert set(executors) == {f"exec-{s}" for s in (*STAGES, "cleanup", "audit-test-split")}
    for name, executor in executors.items():
        container = executor["container"]
        assert container["image"] == images.image("pipeline", registry_=images.DEFAULT_REGISTRY,
                                                  tag_=images.DEFAULT_TAG), name
        # The image has kfp and bincounter installed: nothing is pip-installed at run time.
        assert "pip install" not in " ".join(container["command"]), name


def _tasks(spec: dict) -> dict[str, dict]:
    tasks = dict(spec["root"]["dag"]["tasks"])
    for comp in spec["components"].values():
        tasks.update(comp.get("dag", {}).get("tasks", {}))
    return tasks


def _producer(spec_input: dict) -> str:
    """The task an input comes from; inside a sub-DAG (the deploy condition) it arrives as
    the sub-DAG's input ``pipelinechannel--<task>-<output>``."""
    if "taskOutputArtifact" in spec_input:
        return spec_input["taskOutputArtifact"]["producerTask"]
    if "taskOutputParameter" in spec_input:
        return spec_input["taskOutputParameter"]["producerTask"]
    name = spec_input.get("componentInputArtifact") or spec_input.get("componentInputParameter")
    return name.removeprefix("pipelinechannel--").rsplit("-", 1)[0]


def test_wiring_caching_retries_and_exit_handler(docs):
    spec, _ = docs
    tasks = _tasks(spec)
    assert set(STAGES) | {"cleanup"} <= set(tasks)
    # Download is never served from the cache; deploy and the exit handler always run.
    for name in ("download", "deploy", "cleanup"):
        assert tasks[name]["cachingOptions"] == {}, name
    for name in ("download", "split", "train", "evaluate", "deploy"):
        assert tasks[name]["retryPolicy"]["maxRetryCount"] >= 1, name
    assert "retryPolicy" not in tasks["tune"]  # a Katib search is not retried blindly
    # The cleanup task is the exit handler: it runs after everything, whatever the outcome,
    # and receives the final status.
    cleanup = tasks["cleanup"]
    assert cleanup["triggerPolicy"]["strategy"] == "ALL_UPSTREAM_TASKS_COMPLETED"
    assert "taskFinalStatus" in cleanup["inputs"]["parameters"]["status"]
    # Data flow: the split feeds tune, train, evaluate and deploy; the model feeds evaluate and deploy.
    for name in ("tune", "train", "evaluate", "deploy"):
        assert _producer(tasks[name]["inputs"]["artifacts"]["shards"]) == "split", name
    for name in ("evaluate", "deploy"):
        assert _producer(tasks[name]["inputs"]["artifacts"]["model"]) == "train", name
    assert _producer(tasks["train"]["inputs"]["parameters"]["best_params"]) == "tune"
    assert _producer(tasks["split"]["inputs"]["artifacts"]["raw"]) == "download"
    # Deploy sits under the deploy_model condition, which waits for the evaluation.
    condition = next(t for t in tasks.values() if "deploy_model" in t.get("triggerPolicy", {}).get("condition", ""))
    assert "evaluate" in condition["dependentTasks"]
    assert "deploy" in spec["components"][condition["componentRef"]["name"]]["dag"]["tasks"]


def test_pipeline_parameters_have_defaults(docs):
    spec, _ = docs
    params = spec["root"]["inputDefinitions"]["parameters"]
    signature = inspect.signature(pipeline.bincounter_pipeline.pipeline_func)
    assert set(params) == set(signature.parameters)
    for name, p in params.items():
        assert "defaultValue" in p or p.get("isOptional"), f"{name} has no default"
    assert params["engine"]["defaultValue"] == "kubernetes"
    assert params["image_tag"]["defaultValue"] == images.DEFAULT_TAG
    assert params["arch"]["defaultValue"] == "resnet50"


def test_every_pipeline_parameter_is_documented():
    # The README's "Pipeline parameters" table is the one place parameters are described.
    readme = (REPO / "README.md").read_text()
    table = readme.split("### Pipeline parameters", 1)[1].split("\n## ", 1)[0]
    missing = [name for name in inspect.signature(pipeline.bincounter_pipeline.pipeline_func).parameters
               if f"| `{name}` |" not in table]
    assert not missing, f"README.md's pipeline parameter table does not describe: {missing}"


@pytest.mark.parametrize("name", components.__all__)
def test_component_docstrings_document_every_argument(name):
    # The docstring is the component's documentation (KFP shows it): every input and output is in Args.
    component = getattr(components, name)
    func = component.python_func
    doc = inspect.getdoc(func)
    args_section = doc.split("Args:", 1)[1].split("Returns:", 1)[0].split("Raises:", 1)[0]
    documented = set(re.findall(r"^\s{4}(\w+):", args_section, flags=re.M))
    assert set(inspect.signature(func).parameters) == documented


def test_component_files_import_only_stdlib_and_kfp_at_top_level():
    allowed = {"typing", "kfp", "bincounter.images"}
    for path in sorted((REPO / "components").glob("*.py")):
        if path.name == "__init__.py":
            continue
        top = [line for line in path.read_text().splitlines() if line.startswith(("import ", "from "))]
        for line in top:
            module = line.split()[1]
            assert module in allowed or module.split(".")[0] in {"kfp", "typing"}, f"{path.name}: {line}"
