"""The KFP v2 components of the bincounter pipeline, one file per stage.

Each component is a thin ``@dsl.component`` over the library (``bincounter.*``):
it runs in the project's pipeline image (``bincounter.images.image("pipeline")``,
which has this package and kfp installed, so no pip install at run time), reads
its typed inputs, calls one library function or engine, and publishes typed
outputs. ``docs/pipeline.md`` explains the data flow between them.
"""

from components.audit import audit, audit_test_split
from components.check import check
from components.cleanup import cleanup
from components.deploy import deploy
from components.download import download
from components.evaluate import evaluate
from components.split import split
from components.train import train
from components.tune import tune

__all__ = ["audit", "audit_test_split", "check", "cleanup", "deploy", "download", "evaluate", "split", "train", "tune"]
