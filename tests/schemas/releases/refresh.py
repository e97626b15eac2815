"""Refresh tests/schemas/releases/ from a copy of what each Kubeflow release installs.

    python tests/schemas/releases/refresh.py /path/to/kubeflow-releases

The source folder holds byte-exact copies of kubeflow/manifests files at the tags
v1.10.2 and v1.11.0 (``git show <tag>:<path>``), with ``<release>/.files`` listing
path, size and git blob id. Whole files are copied unchanged; from the two big
multi-document installs (KServe's kserve.yaml, Knative's serving-core.yaml) only the
documents the tests need are cut out, verbatim (the text between two ``---`` lines).
``SOURCES.json`` records, for every file written, the release, upstream path, blob id
of the upstream file and the sha256 of what was written. Tests never read the source
folder; they read only what this script wrote.
"""

from __future__ import annotations

import hashlib
import json
import pathlib
import re
import sys

HERE = pathlib.Path(__file__).resolve().parent
RELEASES = ("1.10.2", "1.11.0")
TAGS = {"1.10.2": "v1.10.2", "1.11.0": "v1.11.0"}
# (upstream path, output name, documents to cut out as (kind, name) or None for the whole file)
FILES = [
    ("applications/training-operator/upstream/base/crds/kubeflow.org_pytorchjobs.yaml",
     "kubeflow.org_pytorchjobs.yaml", None),
    ("applications/trainer/upstream/base/crds/trainer.kubeflow.org_trainjobs.yaml",
     "trainer.kubeflow.org_trainjobs.yaml", None),
    ("applications/kserve/kserve/kserve.yaml", "kserve-inferenceservices-crd.yaml",
     ("CustomResourceDefinition", "inferenceservices.serving.kserve.io")),
    ("applications/kserve/kserve/kserve.yaml", "kserve-inferenceservice-config.yaml",
     ("ConfigMap", "inferenceservice-config")),
    ("common/knative/knative-serving/base/upstream/serving-core.yaml", "knative-config-features.yaml",
     ("ConfigMap", "config-features")),
    ("applications/katib/upstream/installs/katib-standalone/katib-config.yaml", "katib-config.yaml", None),
    ("applications/katib/upstream/components/webhook/webhooks.yaml", "katib-webhooks.yaml", None),
    ("applications/profiles/upstream/base/namespace-labels.yaml", "namespace-labels.yaml", None),
    ("example/kustomization.yaml", "example-kustomization.yaml", None),
]


def _document(text: str, kind: str, name: str) -> str:
    for doc in re.split(r"^---[^\n]*\n", text, flags=re.M):
        if re.search(rf"^kind: {kind}\s*$", doc, re.M) and re.search(rf"^  name: {re.escape(name)}\s*$", doc, re.M):
            return doc
    raise SystemExit(f"no {kind} {name} found")


def main(src: str) -> int:
    src_root = pathlib.Path(src)
    sources, written = [], {}  # (upstream path, document) blob -> file already written
    for release in RELEASES:
        blobs = {}
        for line in (src_root / release / ".files").read_text().splitlines():
            path, _size, blob = line.rsplit(" ", 2)
            blobs[path] = blob
        out_dir = HERE / release
        out_dir.mkdir(exist_ok=True)
        for path, out_name, doc in FILES:
            if path not in blobs:
                continue  # not installed by this release (Trainer v2 in 1.10.2)
            text = (src_root / release / path).read_text()
            if doc:
                text = _document(text, *doc)
            # A file both releases ship unchanged (same blob) is stored once, under the first.
            file = written.setdefault((path, out_name, blobs[path]), f"{release}/{out_name}")
            if file == f"{release}/{out_name}":
                (out_dir / out_name).write_text(text)
            sources.append({"release": release, "file": file, "repo": "kubeflow/manifests", "tag": TAGS[release],
                            "upstream_path": path, "upstream_blob": blobs[path],
                            "document": f"{doc[0]} {doc[1]}" if doc else None,
                            "sha256": hashlib.sha256(text.encode()).hexdigest()})
    (HERE / "SOURCES.json").write_text(json.dumps(sources, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
