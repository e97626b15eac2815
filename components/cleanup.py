"""Component: the exit handler; deletes what a failed or cancelled run left behind."""

from kfp import dsl

from bincounter.images import image  # compile time only: the image name, from its one definition


@dsl.component(base_image=image("pipeline"), install_kfp_package=False)
def cleanup(
    engine: str,
    work_uri: str,
    run_id: str,
    deploy_model: bool = True,
    namespace: str = "",
    s3_endpoint_url: str = "",
):
    """After the run: when it did not succeed, stop its jobs, Experiments and processes.

    Runs as the pipeline's ``dsl.ExitHandler`` task, after the steps whatever their
    outcome. It learns that the run succeeded from the markers the final steps
    write in the working store (``bincounter/runs.py``: evaluate, and deploy when
    ``deploy_model``), not from ``dsl.PipelineTaskFinalStatus``, which KFP backend
    2.5.0 cannot compile. On success it leaves everything (the deployed model keeps
    serving; finished jobs expire by their TTL). Otherwise it deletes this run's
    Katib Experiment and PyTorchJob/TrainJob (``kubernetes``) or stops this run's
    processes (``local``). A working store it cannot read counts as "not
    succeeded": a GPU job left running costs more than a finished one deleted. The
    InferenceService is never deleted here: it may be serving the previous model.

    Args:
        engine: ``kubernetes`` or ``local``.
        work_uri: Working store prefix, where the final steps leave their markers.
        run_id: The pipeline run id whose leftovers to delete.
        deploy_model: Whether the run deploys, i.e. whether deploy is one of the final steps.
        namespace: Namespace of the jobs; empty: the namespace this step runs in.
        s3_endpoint_url: Endpoint of the working store; empty uses the AWS configuration.
    """
    import os

    from bincounter import engines, runs

    engines.check_engine(engine)
    if s3_endpoint_url:
        os.environ["AWS_ENDPOINT_URL"] = s3_endpoint_url
    final_steps = ["evaluate", "deploy"] if deploy_model else ["evaluate"]
    try:
        missing = runs.missing_markers(work_uri, run_id, final_steps)
    except Exception as e:  # unreadable store: clean up rather than leave GPUs running
        missing = final_steps
        print(f"run {run_id}: cannot read its success markers under {work_uri} ({e})")
    if not missing:
        print(f"run {run_id}: succeeded ({', '.join(final_steps)} finished); nothing to clean up")
        return
    print(f"run {run_id}: failed or cancelled (not finished: {', '.join(missing)}); cleaning up")
    if engine == "local":
        from bincounter.engines import local

        print(f"stopped processes: {local.cleanup(run_id) or 'none'}")
    else:
        from bincounter.engines import kubernetes

        print(f"deleted: {kubernetes.cleanup(run_id, namespace=namespace) or 'nothing'}")
