"""The ``bincounter`` command: one subcommand per stage.

Each subcommand lives in its own module, which exposes ``get_args_parser(add_help)``
and ``main(args)`` (the torchvision-recipe shape). Modules are imported only when
their subcommand runs, so ``bincounter download`` never pays for importing torch.

What every command shares is done here, once: ``prepare_parser`` (no abbreviated
flags, the value checks of NUMBER_RULES, help without RST markup) and the error
line: whatever a command raises becomes one ``error: ...`` line (bincounter.errors),
exit code 2 for bad usage and 1 otherwise; ``--debug`` or ``BINCOUNTER_DEBUG=1``
shows the traceback instead.
"""

from __future__ import annotations

import argparse
import importlib
import os
import re
import sys
import traceback

from bincounter import errors

# subcommand -> (module, one-line help). Add a stage here and nowhere else.
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "synth": ("bincounter.data.synth", "write synthetic bin images in the ABID layout"),
    "download": ("bincounter.data.download", "download ABID images and metadata from S3"),
    "split": ("bincounter.data.split", "split a download into train/val/test WebDataset shards"),
    "train": ("bincounter.train", "train the counting model (run under torchrun for DDP)"),
    "evaluate": ("bincounter.evaluate", "evaluate a trained model on test shards"),
    "audit": ("bincounter.audit.cli", "flag bins whose photo disagrees with the expected quantity"),
    "serve": ("bincounter.serving.server", "serve a model folder with the KServe model server"),
    "predict": ("bincounter.serving.client", "query a served model with images"),
    "tune": ("bincounter.engines.local", "tune hyperparameters locally with optuna"),
    "k8s": ("bincounter.k8s.cli", "run training, tuning or deployment on a Kubernetes cluster"),
    "submit": ("bincounter.submit", "upload the pipeline to Kubeflow Pipelines and start a run"),
    "runs": ("bincounter.runs", "list pipeline runs in a working store, or show one run's report"),
}


# ---------------------------------------------------------------- value checks

def _number(kind: type, text: str, ok, what: str):
    try:
        value = kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {'an integer' if kind is int else 'a number'}, got {text!r}")
    if not ok(value):
        raise argparse.ArgumentTypeError(f"must be {what}, got {text}")
    return value


def positive_int(text: str) -> int:
    return _number(int, text, lambda v: v >= 1, ">= 1")


def nonnegative_int(text: str) -> int:
    return _number(int, text, lambda v: v >= 0, ">= 0")


def positive_float(text: str) -> float:
    return _number(float, text, lambda v: v > 0, "> 0")


def nonnegative_float(text: str) -> float:
    return _number(float, text, lambda v: v >= 0, ">= 0")


def fraction(text: str) -> float:
    return _number(float, text, lambda v: 0 <= v < 1, "in [0, 1)")


def port(text: str) -> int:
    return _number(int, text, lambda v: 0 < v < 65536, "a TCP port in 1..65535")


# Flag destination -> the values it accepts. A flag of one name means one thing in every
# command (docs/cli.md), so its check lives here once instead of in each parser. Applied
# only to flags whose parser already types them as int/float, so choices and strings
# keep their own handling.
NUMBER_RULES = {
    "epochs": positive_int, "batch_size": positive_int, "max_batch_size": positive_int,
    "max_image_pixels": positive_int, "max_image_bytes": positive_int, "images": positive_int,
    "shard_size": positive_int, "short_side": nonnegative_int, "max_count": positive_int,
    "trials": positive_int, "parallelism": positive_int, "max_trials": positive_int,
    "parallel_trials": positive_int, "max_failed_trials": nonnegative_int, "nproc_per_node": positive_int,
    "shuffle_buffer": nonnegative_int, "print_freq": positive_int, "torch_threads": nonnegative_int,
    "http_port": port, "grpc_port": port, "val": fraction, "test": fraction,
    "lr": positive_float, "timeout": positive_float, "poll": positive_float, "trial_timeout": positive_float,
    "warmup_epochs": nonnegative_float, "weight_decay": nonnegative_float, "momentum": nonnegative_float,
    "min_replicas": nonnegative_int, "max_replicas": positive_int, "scale_target": positive_int,
    "gpus_per_worker": nonnegative_int, "request_timeout": positive_float, "poll_interval": positive_float,
}

# One name per concept in every command (docs/cli.md). The old spellings still work for one
# release, with a warning, and are hidden from --help. Applied here, to the parsers as the
# stage modules define them, so that every entry point (bincounter CMD, python -m
# bincounter.train under torchrun, the pipeline's extra_train_args check) agrees.
RENAMED_FLAGS: dict[str, dict[str, str]] = {
    "download": {"--dest": "--output", "--dest-endpoint-url": "--output-endpoint-url", "--workers": "--concurrency"},
    "synth": {"--workers": "--concurrency"},
    "split": {"--out": "--output", "--workers": "--processes"},
    "train": {"--workers": "--loader-workers"},
    "evaluate": {"--workers": "--loader-workers"},
    "audit": {"--workers": "--concurrency"},
    "k8s tune": {"--max-trials": "--trials", "--parallel-trials": "--parallelism"},
}


# Where a command's default differs from the pipeline's, --help says so. The pipeline's values
# (pipeline.py; tests/test_cli.py checks them against pipeline.yaml): (command, flag dest) ->
# (pipeline parameter, its default).
PIPELINE_DEFAULTS: dict[tuple[str, str], tuple[str, object]] = {
    ("k8s train", "workers"): ("workers", 2),
    ("k8s train", "gpus_per_worker"): ("gpus_per_worker", 1),
    ("k8s tune", "gpus_per_worker"): ("tune_gpus_per_trial", 1),
    ("k8s tune", "max_trials"): ("tune_trials", 12),
    ("k8s tune", "parallel_trials"): ("tune_parallelism", 3),
    ("tune", "trials"): ("tune_trials", 12),
    ("tune", "parallelism"): ("tune_parallelism", 3),
    ("download", "workers"): ("download_concurrency", 32),
}


class _DeprecatedFlag(argparse.Action):
    """The old spelling of a renamed flag: warns, then acts as the new one."""

    def __init__(self, option_strings, dest, target: argparse.Action, new: str, **kwargs):
        super().__init__(option_strings, dest, nargs=target.nargs, type=target.type, choices=target.choices,
                         help=argparse.SUPPRESS, metavar=target.metavar)
        self.target, self.new = target, new

    def __call__(self, parser, namespace, values, option_string=None):
        print(f"warning: {option_string} is deprecated and goes in the next release; use {self.new}",
              file=sys.stderr)
        self.target(parser, namespace, values, option_string)


def _rename_flags(parser: argparse.ArgumentParser, renames: dict[str, str]) -> None:
    required = []
    for old, new in renames.items():
        action = parser._option_string_actions.get(old)
        if action is None or new in parser._option_string_actions:
            continue  # the module already uses the new name
        action.option_strings = [new if s == old else s for s in action.option_strings]
        if action.metavar is None and action.nargs is None:  # help shows --output OUTPUT, not --output DEST
            action.metavar = new.lstrip("-").replace("-", "_").upper()
        del parser._option_string_actions[old]
        parser._option_string_actions[new] = action
        parser.add_argument(old, dest=action.dest, action=_DeprecatedFlag, target=action, new=new)
        if action.required:  # either spelling satisfies it: checked after parsing
            action.required = False
            required.append((action.dest, new))
    if required:
        parse_known_args = parser.parse_known_args

        def checked(args=None, namespace=None):
            ns, extra = parse_known_args(args, namespace)
            missing = [flag for dest, flag in required if getattr(ns, dest, None) is None]
            if missing:
                parser.error(f"the following arguments are required: {', '.join(missing)}")
            return ns, extra

        parser.parse_known_args = checked


_RST = [(re.compile(r":[a-z]+:`([^`]*)`"), r"\1"), (re.compile(r"``([^`]*)``"), r"\1"), (re.compile(r"\\\\\n"), "\n")]


def plain(text: str | None) -> str | None:
    """Help text without RST markup (``literal``, :func:`name`): --help is read in a terminal."""
    if not text:
        return text
    for pattern, repl in _RST:
        text = pattern.sub(repl, text)
    return text


def _subparsers(parser: argparse.ArgumentParser):
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            yield from action.choices.items()


def _one_line_error(parser: argparse.ArgumentParser):
    def error(message: str):
        # argparse would print the whole usage block first; one line that names the flag is enough.
        parser.exit(errors.USAGE_EXIT, f"error: {message} (see {parser.prog} --help)\n")
    return error


def prepare_parser(parser: argparse.ArgumentParser, command: str = "") -> argparse.ArgumentParser:
    """What every bincounter parser gets: no abbreviations (``--epoch`` is not ``--epochs``),
    the checks of NUMBER_RULES, the names of RENAMED_FLAGS, one-line usage errors, and help
    without RST markup. Subcommand parsers too (``command`` is e.g. ``"k8s"``)."""
    _rename_flags(parser, RENAMED_FLAGS.get(command, {}))
    parser.allow_abbrev = False
    parser.error = _one_line_error(parser)
    parser.description, parser.epilog = plain(parser.description), plain(parser.epilog)
    for action in parser._actions:
        action.help = plain(action.help) if isinstance(action.help, str) else action.help
        pipeline = PIPELINE_DEFAULTS.get((command, action.dest))
        if pipeline and action.help not in (None, argparse.SUPPRESS) and pipeline[1] != action.default:
            action.help += f" [the pipeline's {pipeline[0]} defaults to {pipeline[1]!r}]"
        rule = NUMBER_RULES.get(action.dest)
        if rule is not None and action.type in (int, float) and not action.choices:
            # A float flag keeps accepting floats: only the range comes from the rule.
            if action.type is float and rule in (positive_int, nonnegative_int):
                continue
            action.type = rule
    for name, sub in _subparsers(parser):
        prepare_parser(sub, f"{command} {name}".strip())
    return parser


def group_foreign_flags(parser: argparse.ArgumentParser, foreign: argparse.ArgumentParser, title: str) -> None:
    """Move the flags ``parser`` took from ``foreign`` (via ``parents=``) into their own help group,
    listed after the project's flags (``serve --help``: ours first, KServe's model-server flags after)."""
    theirs = {s for a in foreign._actions for s in a.option_strings} - {"-h", "--help"}
    group = parser.add_argument_group(title)
    for g in parser._action_groups:
        if g is group:
            continue
        moving = [a for a in g._group_actions if a.option_strings and set(a.option_strings) <= theirs]
        g._group_actions[:] = [a for a in g._group_actions if a not in moving]
        group._group_actions.extend(moving)


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("bincounter")
    except PackageNotFoundError:
        return "unknown (not installed)"


def _top_parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(prog="bincounter", description=__doc__.splitlines()[0], allow_abbrev=False)
    top.add_argument("--version", action="version", version=f"bincounter {_version()}")
    top.add_argument("--debug", action="store_true",
                     help=f"show the full traceback when a command fails (also: {errors.DEBUG_ENV}=1)")
    sub = top.add_subparsers(dest="command", metavar="COMMAND")
    for name, (_, help_) in SUBCOMMANDS.items():
        sub.add_parser(name, help=help_, add_help=False)
    return top


def _pop_debug(argv: list[str]) -> tuple[list[str], bool]:
    """``--debug`` anywhere before a ``--`` (after it, flags belong to the training command)."""
    end = argv.index("--") if "--" in argv else len(argv)
    head = [a for a in argv[:end] if a != "--debug"]
    return head + argv[end:], len(head) != end


def run(module_name: str, argv: list[str], prog: str) -> int:
    """Parse ``argv`` with the module's parser and run its ``main``, errors as one line."""
    debug = errors.debug_enabled()
    module = importlib.import_module(module_name)
    parser = prepare_parser(module.get_args_parser(add_help=True), prog.split(" ", 1)[1])
    parser.prog = prog
    if module_name == "bincounter.serving.server":
        # The server module has imported kserve by now (only the server image installs it).
        kserve = sys.modules["kserve"]
        group_foreign_flags(parser, kserve.model_server.parser, "KServe model server flags")
        # argparse's usage line would list KServe's dozen flags before ours.
        parser.usage = "%(prog)s [--model DIR] [--model-name NAME] [--port PORT] [OPTIONS] (all in --help)"
    args = parser.parse_args(argv)  # bad usage: argparse prints usage + one error line, exits 2
    try:
        return int(module.main(args) or 0)
    except SystemExit:
        raise
    except BaseException as e:  # noqa: BLE001 - the one place that turns any failure into a line
        _close_progress_bars()
        if debug:
            traceback.print_exc()
        else:
            known = errors.explain(e)
            hint = "" if known else " (a bug? rerun with --debug for the traceback)"
            print(f"error: {known or errors.describe(e)}{hint}", file=sys.stderr)
        return errors.exit_code(e)


def _close_progress_bars() -> None:
    """End any tqdm bar the failed command left open, so the error starts on its own line."""
    tqdm = sys.modules.get("tqdm")
    for bar in list(getattr(getattr(tqdm, "tqdm", None), "_instances", None) or []):
        bar.close()


def main(argv: list[str] | None = None) -> int:
    argv, debug = _pop_debug(list(sys.argv[1:] if argv is None else argv))
    if debug:
        os.environ[errors.DEBUG_ENV] = "1"  # child processes (torchrun, kfp.local) see it too
    top = _top_parser()
    if not argv or argv[0].startswith("-") or argv[0] not in SUBCOMMANDS:
        top.parse_args(argv[:1] or ["--help"])  # prints help, the version, or the valid choices, and exits
        return 2
    return run(SUBCOMMANDS[argv[0]][0], argv[1:], f"bincounter {argv[0]}")


if __name__ == "__main__":
    sys.exit(main())
