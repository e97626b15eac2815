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
    concurrency: int = 16,
    s3_endpoint_url: str = "",
    split_uri: str = "",
    refresh: bool = False,
    deprecated_workers: int = 0,
):
    """Download the selected bins to ``{work_uri}/abid`` (resumable: a rerun fetches only what changed).

    The images stay in the working store, shared by every run. Each selection
    (source, file_list, max_count, limit) has its own manifest,
    ``{work_uri}/abid/manifest-<key>.json``, so that concurrent runs with other
    selections never read each other's; a rerun with the same selection reuses
    it and downloads nothing (``refresh=True`` downloads again). The ``raw``
    artifact holds the manifest and summary and records in ``metadata`` where
    the images (``uri``) and this selection's manifest (``manifest``) are.

    With ``split_uri`` set, the run starts from that existing split: nothing is downloaded.

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
        concurrency: Transfers in flight (``bincounter download --concurrency``).
        s3_endpoint_url: Endpoint of the working store; empty uses the AWS configuration
            (``AWS_ENDPOINT_URL`` from the S3 Secret on a cluster).
        split_uri: An existing split (folder written by ``bincounter split``); set, this step does nothing.
        refresh: Download again even when this selection was downloaded before.
        deprecated_workers: The pipeline's old ``download_workers`` parameter; above 0 it overrides
            ``concurrency``, with a warning. Goes in the next release.

    Raises:
        ValueError: A bad selection (negative limit, unknown auth mode).
    """
    import hashlib
    import json
    import os
    import time

    from bincounter import storage
    from bincounter.data import download as download_lib

    start = time.monotonic()
    if deprecated_workers > 0:
        print(f"warning: the pipeline parameter download_workers is deprecated and goes in the next release; "
              f"use download_concurrency (taking {deprecated_workers})")
        concurrency = deprecated_workers
    if s3_endpoint_url:
        os.environ["AWS_ENDPOINT_URL"] = s3_endpoint_url
    os.makedirs(raw.path, exist_ok=True)
    if split_uri:
        raw.metadata.update({"uri": "", "split_uri": split_uri, "seconds": 0.0})
        print(f"starting from the existing split {split_uri}: nothing to download")
        return
    dest = storage.join(work_uri, "abid")
    # With k_or_more the bins above max_count stay in (training maps them to "K or more").
    max_count = -1 if k_or_more else max_count
    selection = {"source": source, "file_list": file_list, "max_count": max_count, "limit": limit}
    key = hashlib.sha256(json.dumps(selection, sort_keys=True).encode()).hexdigest()[:16]
    own_manifest = storage.join(dest, f"manifest-{key}.json")
    if not refresh and storage.exists(own_manifest):
        doc = storage.read_json(own_manifest, what="download manifest")
        summary = doc["summary"]
        print(f"reusing the download of this selection: {own_manifest}")
    else:
        for attempt in range(3):
            summary = download_lib.download(
                dest=dest, source=source, file_list=file_list or None,
                max_count=None if max_count < 0 else max_count, limit=limit or None, workers=concurrency,
                auth=source_auth, endpoint_url=source_endpoint_url or None, progress=False)
            doc = storage.read_json(storage.join(dest, download_lib.MANIFEST), what="download manifest")
            # The shared manifest.json is this download's unless a concurrent run rewrote it in between
            # (then download again: resumable, nothing left to fetch).
            if doc["summary"] == summary:
                break
        else:
            raise RuntimeError(f"{dest}/manifest.json kept being rewritten by concurrent downloads")
        storage.write_bytes(own_manifest, json.dumps(doc, indent=1).encode())
    with open(os.path.join(raw.path, download_lib.MANIFEST), "w") as f:
        json.dump(doc, f, indent=1)
    with open(os.path.join(raw.path, download_lib.SUMMARY), "w") as f:
        json.dump(summary, f, indent=2)
    raw.metadata.update({"uri": dest, "manifest": own_manifest, "selection": key, "selected": summary["selected"],
                         "skipped": summary["skipped"], "class_counts": summary["class_counts"],
                         "seconds": round(time.monotonic() - start, 2)})
    print(json.dumps(summary, indent=2))
    if summary["selected"] == 0:
        raise ValueError(f"No bins were selected from {source} (skipped: {summary['skipped_by_reason']}). "
                         "Check source, file_list, max_count and limit.")
