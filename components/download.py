"""Component: download ABID bins (images + metadata) from S3 into the working store."""

from kfp import dsl
from kfp.dsl import Dataset, Output

from bincounter.images import image  # compile time only: the image name, from its one definition


@dsl.component(base_image=image("pipeline"), install_kfp_package=False)
def download(
    raw: Output[Dataset],
    work_uri: str,
    source: str = "s3://aft-vbi-pds",
    source_endpoint_url: str = "https://s3.us-east-1.amazonaws.com",
    source_auth: str = "unsigned",
    file_list: str = "",
    max_count: int = -1,
    k_or_more: bool = False,
    limit: int = 0,
    workers: int = 16,
    s3_endpoint_url: str = "",
):
    """Download the selected bins to ``{work_uri}/abid`` (resumable: a rerun fetches only what changed).

    The images stay in the working store, shared by every run; the ``raw``
    artifact holds the download's ``manifest.json`` and ``summary.json`` and
    records where the images are in ``metadata['uri']``.

    Args:
        raw: Output. The download manifest and summary; ``metadata['uri']`` is the dataset prefix.
        work_uri: Working store prefix (``s3://bucket/prefix`` on a cluster, or a local folder).
        source: ABID bucket or prefix (``s3://aft-vbi-pds``) or a local folder in the ABID layout.
        source_endpoint_url: S3 endpoint of the source. Explicit by default, because inside the
            cluster ``AWS_ENDPOINT_URL`` points at the working store, not at AWS.
        source_auth: ``unsigned`` (public bucket), ``signed`` or ``auto``.
        file_list: Optional ``file_list.json`` (local path or ``s3://`` URI) selecting the bins.
        max_count: Skip bins with more than this many items; -1 keeps all.
        k_or_more: Keep the bins above ``max_count`` anyway (training maps them to the class "K or more").
        limit: Stop after this many complete bins; 0 downloads the whole selection.
        workers: Concurrent bins in flight.
        s3_endpoint_url: Endpoint of the working store; empty uses the AWS configuration
            (``AWS_ENDPOINT_URL`` from the S3 Secret on a cluster).

    Raises:
        ValueError: A bad selection (negative limit, unknown auth mode).
    """
    import json
    import os
    import time

    from bincounter import storage
    from bincounter.data import download as download_lib

    start = time.monotonic()
    if s3_endpoint_url:
        os.environ["AWS_ENDPOINT_URL"] = s3_endpoint_url
    dest = storage.join(work_uri, "abid")
    summary = download_lib.download(
        dest=dest, source=source, file_list=file_list or None, max_count=None if max_count < 0 or k_or_more else max_count,
        limit=limit or None, workers=workers, auth=source_auth, endpoint_url=source_endpoint_url or None,
        progress=False)
    os.makedirs(raw.path, exist_ok=True)
    for name in (download_lib.MANIFEST, download_lib.SUMMARY):
        storage.download_file(storage.join(dest, name), os.path.join(raw.path, name))
    raw.metadata.update({"uri": dest, "selected": summary["selected"], "skipped": summary["skipped"],
                         "class_counts": summary["class_counts"], "seconds": round(time.monotonic() - start, 2)})
    print(json.dumps(summary, indent=2))
    if summary["selected"] == 0:
        raise ValueError(f"No bins were selected from {source} (skipped: {summary['skipped_by_reason']}). "
                         "Check source, file_list, max_count and limit.")
