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
from bincounter import images, storage  # noqa: E402
from bincounter.k8s import objects  # noqa: E402

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
    for stage in (*STAGES, "cleanup"):
        config = json_format.ParseDict(json_format.MessageToDict(executors[f"exec-{stage}"]),
                                       kubernetes_executor_config_pb2.KubernetesExecutorConfig())
        # S3 credentials as env from the Secret named by the s3_secret parameter; the whole
        # Secret as files, for the optional endpoint and region.
        assert {k.env_var for s in config.secret_as_env for k in s.key_to_env} == set(pipeline.S3_REQUIRED_KEYS)
        assert config.secret_as_env[0].secret_name_parameter.component_input_parameter.endswith("s3_secret")
        [volume] = config.secret_as_volume
        assert volume.secret_name_parameter.component_input_parameter.endswith("s3_secret")
        assert volume.mount_path == pipeline.S3_SETTINGS_DIR
        assert config.node_selector.node_selector_json.component_input_parameter.endswith("step_node_selector")
        assert config.tolerations[0].toleration_json.component_input_parameter.endswith("step_tolerations")


def test_every_step_runs_in_the_pipeline_image(docs):
    spec, _ = docs
    executors = spec["deploymentSpec"]["executors"]
    assert set(executors) == {f"exec-{s}" for s in (*STAGES, "check", "cleanup", "audit-test-split")}
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
    # The cleanup task is the exit handler: it runs after everything, whatever the outcome, and
    # reads the success markers that evaluate and deploy leave in the same run folder.
    cleanup = tasks["cleanup"]
    assert cleanup["triggerPolicy"]["strategy"] == "ALL_UPSTREAM_TASKS_COMPLETED"
    assert cleanup["dependentTasks"] == ["exit-handler-1"]
    params = cleanup["inputs"]["parameters"]
    assert params["work_uri"] == {"componentInputParameter": "work_uri"}
    assert params["deploy_model"] == {"componentInputParameter": "deploy_model"}
    run_id = params["run_id"]["runtimeValue"]["constant"]
    assert run_id == "{{$.pipeline_job_uuid}}"
    for name in ("evaluate", "deploy"):
        marker_inputs = tasks[name]["inputs"]["parameters"]
        assert marker_inputs["work_uri"]["componentInputParameter"].endswith("work_uri"), name
        assert marker_inputs["run_id"]["runtimeValue"]["constant"] == run_id, name
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


def _walk(node):
    if isinstance(node, dict):
        for key, value in node.items():
            yield key, value
            yield from _walk(value)
    elif isinstance(node, list):
        for value in node:
            yield from _walk(value)


def test_nothing_that_kfp_backend_2_5_0_cannot_run(docs):
    """Kubeflow 1.10.2 ships KFP backend 2.5.0; one pipeline.yaml must run there and on 2.15.0.

    kubeflow/pipelines at 2.5.0:
    - backend/src/v2/compiler/argocompiler/dag.go, ``addImplicitDependencies``: a task input of
      kind ``taskFinalStatus`` fails the compile with "task final status not supported yet"
      (2.14 compiles exit tasks as Argo exit hooks and accepts it).
    - backend/src/v2/driver/driver.go, ``extendPodSpecPatch``: each ``secretAsEnv`` key becomes a
      ``SecretKeySelector`` with only name and key; the executor config is parsed with unknown
      fields discarded (backend/src/common/util/json.go ``UnmarshalString``), so an
      ``optional: true`` is dropped and a key missing from the Secret stops the pod.
    """
    spec, platform = docs
    assert set(storage.S3_SETTINGS) == set(objects.S3_OPTIONAL_KEYS)  # what the steps read = the Secret's optional keys
    final_status = [k for k, v in _walk(spec) if k == "taskFinalStatus" or v == "TASK_FINAL_STATUS"]
    assert not final_status, "a taskFinalStatus input: KFP backend 2.5.0 cannot compile the pipeline"
    executors = platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    containers = spec["deploymentSpec"]["executors"]
    for name, config in executors.items():
        for mapping in config.get("secretAsEnv", []):
            assert not mapping.get("optional"), f"{name}: an optional secret-as-env mapping is required on 2.5.0"
            keys = {k["secretKey"] for k in mapping["keyToEnv"]}
            assert keys <= set(pipeline.S3_REQUIRED_KEYS), f"{name}: maps {keys}, which a user's Secret may lack"
        if name == "exec-check":
            # The preflight reads no S3 and mounts no Secret: a missing Secret is a row of its table.
            assert "secretAsEnv" not in config and "secretAsVolume" not in config
            continue
        # The optional settings arrive as files of the mounted Secret, where the code looks for them.
        [volume] = config["secretAsVolume"]
        env = {e["name"]: e["value"] for e in containers[name]["container"].get("env", [])}
        assert env[storage.S3_SETTINGS_DIR_ENV] == volume["mountPath"], name


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


def test_the_demo_states_the_pipelines_own_defaults():
    """`make demo` ends by saying what a production run would use: read from pipeline.yaml, so it
    cannot go stale (it once said 224 px and 20 epochs after the recipe moved to 384 px and 30)."""
    from bincounter.demo import production_defaults
    from bincounter.submit import DEFAULT_PIPELINE_FILE, pipeline_parameters

    d = {k: v["default"] for k, v in pipeline_parameters(DEFAULT_PIPELINE_FILE).items()}
    text = production_defaults()
    assert f"{d['arch']} from ImageNet weights" in text
    for part in (f"{int(d['input_size'])} px", f"{int(d['epochs'])} epochs", f"{int(d['tune_trials'])} Katib trials",
                 f"{int(d['workers'])} workers x {int(d['gpus_per_worker'])} GPU"):
        assert part in text
