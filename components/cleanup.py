"""Component: the exit handler; deletes what a failed or cancelled run left behind."""

from kfp import dsl

from bincounter.images import image  # compile time only: the image name, from its one definition


@dsl.component(base_image=image("pipeline"), install_kfp_package=False)
def cleanup(
    status: dsl.PipelineTaskFinalStatus,
    engine: str,
    run_id: str,
    namespace: str = "",
):
    """After the run: when it did not succeed, stop its jobs, Experiments and processes.

    Runs as the pipeline's ``dsl.ExitHandler`` task, so it runs whether the
    steps succeeded, failed or were cancelled. On success it leaves everything
    (the deployed model keeps serving; finished jobs expire by their TTL). On
    failure it deletes this run's PyTorchJob/TrainJob and Katib Experiment
    (``kubernetes``) or stops this run's processes (``local``). The
    InferenceService is never deleted here: it may be serving the previous model.

    Args:
        status: The final status of the run's steps (set by KFP).
        engine: ``kubernetes`` or ``local``.
        run_id: The pipeline run id whose leftovers to delete.
        namespace: Namespace of the jobs; empty: the namespace this step runs in.
    """
    from bincounter import engines

    engines.check_engine(engine)
    print(f"run {run_id}: {status.state}" + (f" ({status.error_message})" if status.error_message else ""))
    if status.state == "SUCCEEDED":
        return
    if engine == "local":
        from bincounter.engines import local

        print(f"stopped processes: {local.cleanup(run_id) or 'none'}")
    else:
        from bincounter.engines import kubernetes

        print(f"deleted: {kubernetes.cleanup(run_id, namespace=namespace) or 'nothing'}")
