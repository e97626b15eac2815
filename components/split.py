"""Component: split the downloaded bins into train/val/test WebDataset shards."""

from kfp import dsl
from kfp.dsl import Dataset, Input, Output

from bincounter.images import image  # compile time only: the image name, from its one definition


@dsl.component(base_image=image("pipeline"), install_kfp_package=False)
def split(
    raw: Input[Dataset],
    shards: Output[Dataset],
    work_uri: str,
    run_id: str,
    val: float = 0.1,
    test: float = 0.1,
    seed: int = 0,
    short_side: int = 0,
    input_size: int = 384,
    shard_size: int = 1000,
    train_ids: str = "",
    val_ids: str = "",
    processes: int = 8,
    s3_endpoint_url: str = "",
    split_uri: str = "",
):
    """Write train/val/test shards to ``{work_uri}/splits/<key>``, or reuse them: stratified by
    count, or the standard ABID split when ``train_ids`` / ``val_ids`` name its files.

    The key hashes this selection's download manifest and the split settings: a
    rerun with the same selection and settings finds the finished split (its
    ``manifest.json`` is written last) and reuses it. ``split_uri`` names an
    existing split to start from instead. Either way the run records which
    split it used in ``{work_uri}/runs/{run_id}/split.json``.

    Training pods on a cluster read the shards from the working store, so they
    go there, not into the artifact; the ``shards`` artifact holds the split's
    ``manifest.json``, class distribution and sample images (shown in the UI)
    and records the shards' prefix in ``metadata['uri']``.

    Args:
        raw: The download (``metadata['uri']`` is the ABID-layout prefix).
        shards: Output. Manifest, class distribution and plots; ``metadata['uri']`` is the split prefix.
        work_uri: Working store prefix.
        run_id: The pipeline run id; names this run's folder in the working store.
        val: Validation fraction per class.
        test: Test fraction per class.
        seed: Assignment and shard-order seed.
        short_side: Images are resized so their short side is this many pixels; 0 follows ``input_size``.
        input_size: The model input the shards are for: the trainer reads each whole image at this
            size, so a larger short side only costs decode time.
        shard_size: Samples per shard.
        train_ids: Path or ``s3://`` URI of a split file for train (``counting_train.json``: the
            324,735 bins the published counting figures train on); empty: stratified split.
        val_ids: Path or ``s3://`` URI of a split file for val (``counting_val.json``, 36,032 bins);
            test is then carved from train by ``test``, as the standard split has no test set.
        processes: Processes that re-encode images (``bincounter split --processes``).
        s3_endpoint_url: Endpoint of the working store; empty uses the AWS configuration.
        split_uri: An existing split folder to use as is (download and split are skipped).
    """
    import hashlib
    import json
    import os
    import time

    from bincounter import presets, storage
    from bincounter.data import download as download_lib
    from bincounter.data import shards as shards_lib
    from bincounter.data import split as split_lib
    from bincounter.data.shards import MANIFEST

    start = time.monotonic()
    if s3_endpoint_url:
        os.environ["AWS_ENDPOINT_URL"] = s3_endpoint_url
    split_uri = split_uri or raw.metadata.get("split_uri", "")
    if split_uri:
        out = split_uri
        manifest = shards_lib.read_manifest(out)  # names the folder if it is not a split
        print(f"using the existing split {out}")
    else:
        # This selection's own download manifest, not a listing and not the shared manifest.json:
        # it names exactly this run's bins (the shared folder may hold more from other runs).
        source = raw.metadata.get("manifest") or storage.join(raw.metadata.get("uri") or raw.path,
                                                              download_lib.MANIFEST)
        short_side = short_side or presets.short_side_for(input_size)
        settings = {"val": val, "test": test, "seed": seed, "short_side": short_side, "shard_size": shard_size,
                    "train_ids": train_ids, "val_ids": val_ids, "format": split_lib.FORMAT}
        digest = hashlib.sha256(storage.read_bytes(source) + json.dumps(settings, sort_keys=True).encode())
        out = storage.join(work_uri, "splits", digest.hexdigest()[:16])
        if storage.exists(storage.join(out, MANIFEST)):
            manifest = shards_lib.read_manifest(out)
            print(f"reusing the split of this selection and these settings: {out}")
        else:
            manifest = split_lib.split(source, out=out, val=val, test=test, seed=seed,
                                       short_side=short_side, shard_size=shard_size, workers=processes,
                                       train_ids=train_ids or None, val_ids=val_ids or None)
    storage.write_bytes(storage.join(work_uri, "runs", run_id, "split.json"), json.dumps({"uri": out}).encode())
    os.makedirs(shards.path, exist_ok=True)
    for rel in [MANIFEST, *manifest.get("files", {}).values()]:
        storage.download_file(storage.join(out, rel), os.path.join(shards.path, rel))
    shards.metadata.update({
        "uri": out, "samples": {name: s["samples"] for name, s in manifest["splits"].items()},
        "skipped": len(manifest["skipped"]), "seconds": round(time.monotonic() - start, 2)})
    print(split_lib.summary_text(manifest))
