"""Component: the preflight (``bincounter k8s check``); the pipeline's first step."""

from kfp import dsl

from bincounter.images import image  # compile time only: the image name, from its one definition


@dsl.component(base_image=image("pipeline"), install_kfp_package=False)
def check(
    engine: str,
    namespace: str = "",
    s3_secret: str = "bincounter-s3",
    use_trainjob: bool = False,
    tune_trials: int = 12,
    deploy_model: bool = True,
):
    """Check the cluster before hours of work: stop the run at once, with the table of checks.

    The same checks as ``bincounter k8s check`` (``bincounter/k8s/check.py``): training APIs,
    Katib, KServe, the namespace label, the S3 Secret, the ServiceAccounts, the launchers'
    rights and the Knative features the predictor needs. ``engine="local"`` has no cluster:
    it passes with one row that says so.

    Args:
        engine: ``kubernetes`` or ``local``.
        namespace: Namespace the run's jobs go to; empty: the namespace this step runs in.
        s3_secret: Secret with the S3 credentials.
        use_trainjob: The run prefers TrainJob (Trainer v2) to PyTorchJob.
        tune_trials: Tuning trials (0: Katib is not needed).
        deploy_model: The run deploys (KServe is needed).

    Raises:
        RuntimeError: A check failed; the printed table says which and how to fix it.
    """
    from bincounter import engines
    from bincounter.k8s import check as preflight

    engines.check_engine(engine)
    rows = preflight.preflight(engine, namespace=namespace, s3_secret=s3_secret,
                               training="TrainJob" if use_trainjob else "auto",
                               tune=tune_trials > 0, deploy=deploy_model)
    table = preflight.format_table(rows)
    print(table, flush=True)
    if preflight.failed(rows):
        raise RuntimeError("preflight failed (bincounter k8s check):\n" + table)
