"""Component: deploy the model (KServe InferenceService on a cluster, a local model-server process locally)."""

from typing import NamedTuple

from kfp import dsl
from kfp.dsl import Dataset, Input, Model

from bincounter.images import image  # compile time only: the image name, from its one definition


@dsl.component(base_image=image("pipeline"), install_kfp_package=False)
def deploy(
    model: Input[Model],
    shards: Input[Dataset],
    engine: str,
    run_id: str,
    model_name: str = "bincounter",
    smoke_images: int = 4,
    min_replicas: int = 1,
    max_replicas: int = 3,
    namespace: str = "",
    image_tag: str = "",
    deadline_minutes: int = 30,
    s3_endpoint_url: str = "",
    s3_secret: str = "bincounter-s3",
    work_uri: str = "",
) -> NamedTuple("Outputs", [("endpoint", str), ("handle", str), ("predictions", list)]):
    """Serve the model and check it answers: a prediction for ``smoke_images`` test images.

    ``engine="kubernetes"`` creates or updates the InferenceService ``model_name``
    (``storageUri``: the model folder in the working store) and waits until it is
    Ready at its new generation. ``engine="local"`` starts ``bincounter serve`` as
    a background process on a free port; it keeps serving after the pipeline ends
    (stop it with ``bincounter.engines.local.stop_server(handle)``).

    Args:
        model: The trained model folder (``metadata['uri']`` in the working store).
        shards: The split, for the smoke-test images.
        engine: ``kubernetes`` or ``local``.
        run_id: The pipeline run id (recorded on the deployment).
        model_name: Name of the InferenceService and of the model in the endpoint paths.
        smoke_images: Test images to send once the endpoint is ready (0: no check).
        min_replicas: Fewest predictor replicas (kubernetes).
        max_replicas: Most predictor replicas (kubernetes).
        namespace: Namespace of the InferenceService; empty: the namespace this step runs in.
        image_tag: Tag of the server image; empty: the tag this pipeline was compiled with.
        deadline_minutes: Give up after this long waiting for readiness.
        s3_endpoint_url: Endpoint of the working store; empty uses the AWS configuration.
        s3_secret: Secret with the S3 credentials, for KServe's storage initializer.
        work_uri: Working store prefix, for the run's success marker (empty: no marker).

    Returns:
        endpoint: Base URL of the model server.
        handle: The local server's process id, or the InferenceService name.
        predictions: One ``{"id", "true_count", "count", "confidence"}`` per smoke-test image.

    Raises:
        RuntimeError: The endpoint did not answer the smoke-test request.
    """
    import os
    from collections import namedtuple

    from bincounter import engines, runs
    from bincounter.data import shards as shards_lib
    from bincounter.serving import client

    engines.check_engine(engine)
    if s3_endpoint_url:
        os.environ["AWS_ENDPOINT_URL"] = s3_endpoint_url
    if engine == "local":
        from bincounter.engines import local

        deployment = local.start_server(model.path, model_name=model_name, run_id=run_id,
                                        ready_timeout_s=deadline_minutes * 60)
    else:
        from bincounter.engines import kubernetes

        deployment = kubernetes.deploy(model.metadata["uri"], model_name=model_name, run_id=run_id,
                                       namespace=namespace, image_tag=image_tag, min_replicas=min_replicas,
                                       max_replicas=max_replicas, s3_secret=s3_secret,
                                       deadline_s=deadline_minutes * 60)
    print(f"serving {model_name} at {deployment.url}")
    predictions = []
    if smoke_images > 0:
        data = shards.metadata.get("uri") or shards.path
        samples = []
        for uri in shards_lib.shard_uris(data, "test"):
            for sample in shards_lib.iter_shard(uri):
                samples.append(sample)
                if len(samples) == smoke_images:
                    break
            if len(samples) == smoke_images:
                break
        try:
            results = client.predict([s.jpeg for s in samples], url=deployment.url, names=[s.id for s in samples],
                                     model_name=model_name, **deployment.details.get("client", {}))
        except client.PredictError as e:
            raise RuntimeError(f"{model_name} at {deployment.url} is up but did not answer a prediction: {e}")
        for s, r in zip(samples, results):
            predictions.append({"id": s.id, "true_count": s.count, "count": r.count,
                                "confidence": round(r.confidence, 4)})
            print(f"bin {s.id}: predicted {r.count} (confidence {r.confidence:.2f}), true {s.count}")
    if work_uri:  # last: the exit handler reads it as "deploy finished" (bincounter/runs.py)
        runs.mark_succeeded(work_uri, run_id, "deploy", endpoint=deployment.url)
    return namedtuple("Outputs", ["endpoint", "handle", "predictions"])(deployment.url, deployment.handle, predictions)
