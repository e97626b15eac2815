"""`bincounter k8s check|train|tune|deploy`: check a cluster, or run a stage on it and wait for it.

    bincounter k8s check --namespace kubeflow-user-example-com
    bincounter k8s train --data s3://b/split --output s3://b/models/m1 --workers 2 --gpus-per-worker 1 -- --epochs 10
    bincounter k8s tune --data s3://b/split --trials-uri s3://b/tuning --max-trials 12 -- --epochs 3
    bincounter k8s deploy --storage-uri s3://b/models/m1

``check`` prints one row per preflight check (bincounter.k8s.check) and exits 1 when one
fails. Arguments after ``--`` go to ``bincounter.train`` unchanged. The result (model URI,
best hyperparameters, endpoint URL) is printed as JSON on the last line, and
written to --result-json when given.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys

from bincounter.k8s import check, launchers, objects as o


def _key_value(text: str) -> tuple[str, str]:
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    k, v = text.split("=", 1)
    return k, v


def _toleration(text: str) -> dict:
    """KEY[=VALUE][:EFFECT] -> a toleration (Exists without a value, Equal with one)."""
    spec, _, effect = text.partition(":")
    key, eq, value = spec.partition("=")
    if not key:
        raise argparse.ArgumentTypeError(f"expected KEY[=VALUE][:EFFECT], got {text!r}")
    tol = {"key": key, "operator": "Equal" if eq else "Exists"}
    if eq:
        tol["value"] = value
    if effect:
        if effect not in ("NoSchedule", "PreferNoSchedule", "NoExecute"):
            raise argparse.ArgumentTypeError(f"Invalid effect {effect!r}. Only NoSchedule, PreferNoSchedule and NoExecute are supported.")
        tol["effect"] = effect
    return tol


def _common(p: argparse.ArgumentParser, name: str, timeout_s: float, poll_s: float, replace: bool):
    p.add_argument("--name", default=name, help="object name")
    p.add_argument("--namespace", default=o.DEFAULT_NAMESPACE, help="namespace (a Kubeflow profile namespace inside Kubeflow)")
    p.add_argument("--image", default=None, help="container image (default: from bincounter.images)")
    p.add_argument("--timeout", type=float, default=timeout_s, help="seconds to wait before giving up")
    p.add_argument("--poll", type=float, default=poll_s, help="seconds between status checks")
    p.add_argument("--replace", action=argparse.BooleanOptionalAction, default=replace,
                   help="replace an existing object of the same name")
    p.add_argument("--cleanup", choices=launchers.CLEANUP_CHOICES, default="on-failure",
                   help="when to delete the object")
    p.add_argument("--node-selector", type=_key_value, action="append", default=[], metavar="KEY=VALUE",
                   help="node selector (repeatable)")
    p.add_argument("--toleration", type=_toleration, action="append", default=[], metavar="KEY[=VALUE][:EFFECT]",
                   help="toleration (repeatable)")
    p.add_argument("--kubeconfig", default=None, help="kubeconfig file (default: in-cluster config, else ~/.kube/config)")
    p.add_argument("--context", default=None, help="kubeconfig context")
    p.add_argument("--result-json", default=None, help="also write the result JSON to this file")


def _resources(p: argparse.ArgumentParser, cpu: str, memory: str, training: bool):
    p.add_argument("--cpu", default=cpu, help="CPU request and limit per pod")
    p.add_argument("--memory", default=memory, help="memory request and limit per pod")
    if training:
        p.add_argument("--workers", type=int, default=1, help="pods (nodes), the Master included")
        p.add_argument("--nproc-per-node", type=int, default=1, help="torchrun processes per pod (one per GPU)")
        p.add_argument("--gpus-per-worker", type=int, default=0, help="GPUs per pod")
        p.add_argument("train_args", nargs=argparse.REMAINDER, help="after --: flags for bincounter train")


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    fmt = argparse.ArgumentDefaultsHelpFormatter
    parser = argparse.ArgumentParser(prog="bincounter k8s", description=__doc__.splitlines()[0], add_help=add_help,
                                     formatter_class=fmt)
    sub = parser.add_subparsers(dest="stage", required=True, metavar="{check,train,tune,deploy}")

    p = sub.add_parser("check", help="preflight: is this cluster and namespace ready for a run?", formatter_class=fmt)
    p.add_argument("--namespace", default=None,
                   help="namespace to check (default: the kubeconfig context's, else bincounter)")
    p.add_argument("--s3-secret", default=o.S3_SECRET, help="Secret with the S3 credentials")
    p.add_argument("--training", choices=check.TRAINING_CHOICES, default="auto",
                   help="training API the run will use (auto: PyTorchJob if installed, else TrainJob)")
    p.add_argument("--tune", action=argparse.BooleanOptionalAction, default=True, help="the run tunes (Katib)")
    p.add_argument("--deploy", action=argparse.BooleanOptionalAction, default=True, help="the run deploys (KServe)")
    p.add_argument("--deployment-mode", choices=o.DEPLOYMENT_MODES, default="Serverless", help="KServe deployment mode")
    p.add_argument("--kubeconfig", default=None, help="kubeconfig file (default: in-cluster config, else ~/.kube/config)")
    p.add_argument("--context", default=None, help="kubeconfig context")

    p = sub.add_parser("train", help="run a PyTorchJob or TrainJob to completion", formatter_class=fmt)
    p.add_argument("--data", required=True, help="split folder URI (s3://...) written by bincounter split")
    p.add_argument("--output", required=True, help="model folder URI (s3://...) the job writes")
    p.add_argument("--kind", choices=("PyTorchJob", "TrainJob"), default="PyTorchJob",
                   help="Training Operator v1 PyTorchJob or Trainer v2 TrainJob")
    _common(p, "bincounter-train", 24 * 3600, 10, False)
    _resources(p, "4", "16Gi", training=True)

    p = sub.add_parser("tune", help="run a Katib Experiment and print the best hyperparameters", formatter_class=fmt)
    p.add_argument("--data", required=True, help="split folder URI (s3://...)")
    p.add_argument("--trials-uri", required=True, help="URI under which each trial writes its model folder")
    p.add_argument("--algorithm", choices=o.ALGORITHMS, default="tpe", help="Katib suggestion algorithm")
    p.add_argument("--parallel-trials", type=int, default=2, help="trials running at once")
    p.add_argument("--max-trials", type=int, default=12, help="trials in total")
    p.add_argument("--max-failed-trials", type=int, default=3, help="failed trials before the experiment fails")
    _common(p, "bincounter-tune", 24 * 3600, 15, False)
    _resources(p, "4", "16Gi", training=True)

    p = sub.add_parser("deploy", help="create or update the InferenceService and wait until Ready", formatter_class=fmt)
    p.add_argument("--storage-uri", required=True, help="model folder URI (s3://...) to serve")
    p.add_argument("--min-replicas", type=int, default=1, help="minimum predictor replicas (0 scales to zero)")
    p.add_argument("--max-replicas", type=int, default=3, help="maximum predictor replicas")
    p.add_argument("--scale-metric", choices=("concurrency", "rps", "cpu", "memory"), default=None,
                   help="autoscaling metric (default: concurrency for Serverless, cpu for RawDeployment)")
    p.add_argument("--deployment-mode", choices=o.DEPLOYMENT_MODES, default="Serverless",
                   help="KServe deployment mode; RawDeployment allows --node-selector/--toleration (GPU nodes)")
    p.add_argument("--scale-target", type=int, default=8, help="autoscaling target per replica")
    _common(p, o.MODEL_NAME, 1800, 5, True)
    _resources(p, "1", "2Gi", training=False)
    return parser


def _common_kwargs(args) -> dict:
    return dict(image=args.image, timeout_s=args.timeout, poll_s=args.poll, replace=args.replace,
                cleanup=args.cleanup, node_selector=dict(args.node_selector) or None,
                tolerations=args.toleration or None, cpu=args.cpu, memory=args.memory)


def _train_args(args) -> list[str]:
    extra = list(args.train_args)
    return extra[1:] if extra[:1] == ["--"] else extra


def train_kwargs(args) -> dict:
    return dict(data_uri=args.data, model_uri=args.output, kind=args.kind, extra_args=_train_args(args),
                workers=args.workers, nproc_per_node=args.nproc_per_node, gpus_per_worker=args.gpus_per_worker,
                **_common_kwargs(args))


def tune_kwargs(args) -> dict:
    return dict(data_uri=args.data, trials_uri=args.trials_uri, extra_args=_train_args(args),
                workers=args.workers, nproc_per_node=args.nproc_per_node, gpus_per_worker=args.gpus_per_worker,
                algorithm=args.algorithm, parallel_trials=args.parallel_trials, max_trials=args.max_trials,
                max_failed_trials=args.max_failed_trials, **_common_kwargs(args))


def deploy_kwargs(args) -> dict:
    return dict(storage_uri=args.storage_uri, min_replicas=args.min_replicas, max_replicas=args.max_replicas,
                scale_metric=args.scale_metric, scale_target=args.scale_target,
                deployment_mode=args.deployment_mode, **_common_kwargs(args))


def run_check(args: argparse.Namespace, api_client=None) -> int:
    client = api_client or launchers.load_api_client(args.kubeconfig, args.context)
    rows = check.run_checks(launchers.resolve_namespace(args.namespace), api_client=client, s3_secret=args.s3_secret,
                            training=args.training, tune=args.tune, deploy=args.deploy,
                            deployment_mode=args.deployment_mode)
    print(check.format_table(rows))
    return 1 if check.failed(rows) else 0


def main(args: argparse.Namespace, api_client=None) -> int:
    if args.stage == "check":
        return run_check(args, api_client)
    run, kwargs = {"train": (launchers.train, train_kwargs), "tune": (launchers.tune, tune_kwargs),
                   "deploy": (launchers.deploy, deploy_kwargs)}[args.stage]
    client = api_client or launchers.load_api_client(args.kubeconfig, args.context)
    try:
        result = run(args.name, args.namespace, api_client=client, **kwargs(args))
    except launchers.LaunchError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    text = json.dumps(result, sort_keys=True)
    if args.result_json:
        pathlib.Path(args.result_json).write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main(get_args_parser().parse_args()))
