"""`bincounter audit`: flag the bins whose photo disagrees with the warehouse system's expected quantity.

Scores every bin of an ABID folder or bucket (``bin-images/`` + ``metadata/``), or of a split's
shards (``--split test``), with a model folder, and writes ``audit.csv`` (``id, expected_quantity,
predicted_count, p_expected, flagged``), ``audit.jsonl`` (with every class probability),
``skipped.json``, ``summary.json`` and the report ``audit.md`` / ``audit.html``. Examples::

    bincounter audit --model runs/model --source s3://aft-vbi-pds --output s3://my-bucket/audit --limit 10000
    bincounter audit --model runs/model --source runs/split --split test --output runs/audit \\
        --inject-discrepancies 0.1 --seed 0        # measured detection quality: precision, recall, AUROC
    bincounter audit --model runs/model --source data/abid --output runs/audit \\
        --target-precision 0.9 --validation runs/split   # the threshold chosen on the validation split

A killed run rerun with the same arguments skips the finished chunks. On a cluster, pod i of
an Indexed Job runs ``--part i --parts N --score-only`` and one ``--merge-only`` run writes the
table and report (docs/audit.md).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from bincounter import storage
from bincounter.audit import core

VALIDATION_DIR = "validation"
DEFAULT_VALIDATION_PREVALENCE = 0.1


def choose_threshold(model: str, validation: str, output: str, target_precision: float, *, split: str = "val",
                     prevalence: float = DEFAULT_VALIDATION_PREVALENCE, seed: int = 0, **score_kw) -> dict:
    """Score the validation split with injected discrepancies (in ``OUTPUT/validation``, resumable) and pick
    the largest threshold whose precision there is >= ``target_precision``."""
    from bincounter.audit import metrics

    val_out = storage.join(output, VALIDATION_DIR)
    settings = core.Settings(model=model, source=validation, split=split, inject_discrepancies=prevalence, seed=seed)
    core.score(settings, val_out, **score_kw)
    p, truth = [], []
    for chunk in core.iter_chunk_files(val_out):
        for row in chunk["rows"]:
            p.append(row["p_expected"])
            truth.append(row["injected"])
    if not p:
        raise core.AuditError(f"The {split} split of {validation} has no bin the model can judge")
    best = metrics.threshold_for_precision(p, truth, target_precision)
    if best is None:
        raise core.AuditError(f"No threshold reaches precision {target_precision} on the {split} split of "
                              f"{validation} ({sum(truth)} of {len(p)} bins discrepant); lower --target-precision")
    best.update(target_precision=target_precision, split=f"{validation} ({split})", bins=len(p),
                discrepant=int(sum(truth)), prevalence=prevalence, seed=seed)
    return best


def audit(*, model: str, source: str, output: str, split: str = "", threshold: float | None = None,
          target_precision: float | None = None, validation: str = "", validation_split: str = "val",
          limit: int | None = None, inject_discrepancies: float = 0.0, seed: int = 0,
          chunk_size: int = core.DEFAULT_CHUNK_SIZE, part: int = 0, parts: int = 1, score_only: bool = False,
          merge_only: bool = False, workers: int = 4, batch_size: int = 32, device: str = "auto",
          endpoint_url: str | None = None, auth: str = "auto", progress: bool = True) -> dict:
    """Score (this part of) the selection and, unless ``score_only``, merge it into the table and report.

    Returns the summary (merge) or the scoring counts (``score_only``).
    """
    from bincounter import model as model_lib

    if threshold is not None and target_precision is not None:
        raise core.AuditError("Give --threshold or --target-precision, not both")
    if target_precision is not None and not validation:
        raise core.AuditError("--target-precision needs --validation SPLIT_FOLDER to choose the threshold on")
    if score_only and merge_only:
        raise core.AuditError("--score-only and --merge-only exclude each other")
    if parts > 1 and not score_only:
        raise core.AuditError("--parts > 1 scores one part: add --score-only, then merge with --merge-only")
    settings = core.Settings(model=model, source=source, split=split, chunk_size=chunk_size, limit=limit,
                             inject_discrepancies=inject_discrepancies, seed=seed)
    score_kw = dict(workers=workers, batch_size=batch_size, device=device, endpoint_url=endpoint_url, auth=auth,
                    progress=progress)
    if not merge_only:
        stats = core.score(settings, output, part=part, parts=parts, **score_kw)
        if score_only:
            return stats
    config = model_lib.load_config(model)
    choice = None
    if target_precision is not None:
        choice = choose_threshold(model, validation, output, target_precision, split=validation_split,
                                  prevalence=inject_discrepancies or DEFAULT_VALIDATION_PREVALENCE, seed=seed,
                                  **score_kw)
        threshold = choice["threshold"]
    if threshold is None:
        threshold = config.audit_threshold
    if not 0 < threshold <= 1:
        raise core.AuditError(f"--threshold must be in (0, 1], got {threshold}")
    planned = len(core.plan_chunks(source, split, chunk_size, limit, endpoint_url))
    return core.merge(output, threshold, expected_chunks=planned, settings=settings,
                      calibration=config.calibration or None, threshold_choice=choice)


def summary_line(summary: dict) -> str:
    """``audit-bins=280 audit-flagged=31 ...``: the name=value shape of the other stages."""
    out = f"audit-bins={summary['bins']} audit-flagged={summary['flagged']} audit-skipped={summary['skipped']}"
    det = summary.get("detection")
    if det:
        out += " " + " ".join(f"audit-{k.replace('_', '-')}={det[k]:.4f}" for k in
                              ("precision", "recall", "f1", "auroc", "precision_at_1pct", "precision_at_5pct")
                              if det[k] is not None)
    return out


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], add_help=add_help,
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="\n".join(__doc__.splitlines()[2:]))
    p.add_argument("--model", required=True, help="model folder written by `bincounter train` (folder or s3://)")
    p.add_argument("--source", required=True,
                   help="ABID folder or s3:// prefix (bin-images/ + metadata/), or a split folder with --split")
    p.add_argument("--output", required=True, help="folder or s3:// prefix for the table, report and chunk files")
    p.add_argument("--split", default="", help="read the shards of this split of --source (e.g. test)")
    p.add_argument("--threshold", type=float, default=None,
                   help="flag a bin when p_expected < this (default: the model's audit_threshold)")
    p.add_argument("--target-precision", type=float, default=None,
                   help="instead of --threshold: the largest threshold with this precision on --validation")
    p.add_argument("--validation", default="", help="split folder whose validation split chooses the threshold")
    p.add_argument("--validation-split", default="val", help="split of --validation to choose it on")
    p.add_argument("--limit", type=int, default=None, help="audit only the first N bins (sorted ids)")
    p.add_argument("--inject-discrepancies", type=float, default=0.0, metavar="F",
                   help="alter the expected quantity of a fraction F of bins by +-1..3 and measure how well the "
                        "audit finds them (labelled data only)")
    p.add_argument("--seed", type=int, default=0, help="seed of the injected discrepancies")
    p.add_argument("--chunk-size", type=int, default=core.DEFAULT_CHUNK_SIZE,
                   help="bins per chunk: the unit of resuming and of --parts (ABID layout; a split: one shard)")
    p.add_argument("--part", type=int, default=int(os.environ.get("JOB_COMPLETION_INDEX", 0)),
                   help="score the chunks c with c %% parts == part (default: $JOB_COMPLETION_INDEX, else 0)")
    p.add_argument("--parts", type=int, default=1, help="how many parts score the selection")
    p.add_argument("--score-only", action="store_true", help="score this part, do not merge")
    p.add_argument("--merge-only", action="store_true", help="merge the scored chunks into the table and report")
    p.add_argument("--workers", type=int, default=4, help="threads fetching and decoding images")
    p.add_argument("--batch-size", type=int, default=32, help="images per forward pass")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"), help="where to run the model")
    p.add_argument("--endpoint-url", default=None, help="S3-compatible endpoint of --source (default: AWS config)")
    p.add_argument("--auth", default="auto", choices=("auto", "unsigned", "signed"),
                   help="S3 auth of --source: auto reads anonymously when no AWS credentials are configured")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def main(args: argparse.Namespace) -> int:
    try:
        result = audit(model=args.model, source=args.source, output=args.output, split=args.split,
                       threshold=args.threshold, target_precision=args.target_precision, validation=args.validation,
                       validation_split=args.validation_split, limit=args.limit,
                       inject_discrepancies=args.inject_discrepancies, seed=args.seed, chunk_size=args.chunk_size,
                       part=args.part, parts=args.parts, score_only=args.score_only, merge_only=args.merge_only,
                       workers=args.workers, batch_size=args.batch_size, device=args.device,
                       endpoint_url=args.endpoint_url, auth=args.auth, progress=not args.no_progress)
    except (core.AuditError, FileNotFoundError, KeyError) as e:
        print(f"bincounter audit: error: {e}", file=sys.stderr)
        return 2
    if args.score_only:
        print(json.dumps(result))
    else:
        print(summary_line(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(get_args_parser().parse_args()))
