"""The ``parity`` command line: ``doctor``, ``run``, ``record``, ``compare``, ``replay``, ``faults``.

Exit status: 0 when every configuration that ran is consistent or roundoff, 1 when
any is divergent or failed, 2 for invalid input (the message names the value and
the fix), 128 plus the signal number (130 for SIGINT, 143 for SIGTERM) when a
signal stopped the run after the results so far were written.
"""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Any

from parity.errors import ParityError

log = logging.getLogger("parity")


def _add_doctor(commands: Any) -> None:
    doctor = commands.add_parser(
        "doctor",
        help="train a built-in scenario in lockstep on every configuration here and compare",
        description="Train a scenario in lockstep on every configuration available on this "
        "machine (or those given), compare each with a float64 referee in units of "
        "round-off, and write a report.",
    )
    doctor.add_argument(
        "--scenario",
        default="circles",
        help="circles (default), moons, blobs, digits, wide (a 1100-unit layer) or "
        "large-circles (features of about 1e3)",
    )
    doctor.add_argument(
        "--epochs",
        type=int,
        help="epochs to train (default: the scenario's, 100 for circles)",
    )
    doctor.add_argument(
        "--batch-size", type=int, help="batch size (default: the scenario's, 32)"
    )
    doctor.add_argument(
        "--activation",
        default="relu",
        help="hidden-layer activation of the scenario's model",
    )
    doctor.add_argument(
        "--localize",
        action="store_true",
        help="for each divergent configuration, find the step, layer, phase and setting "
        "that introduce the error, write a reproducer and test a workaround; also "
        "diagnose whether the model itself is nearly linear",
    )
    doctor.add_argument(
        "--rerun-workaround",
        action="store_true",
        help="with --localize, also rerun each divergent configuration for all its "
        "epochs with the workaround and give it the doctor's verdict (one more "
        "worker each; an eager-mode workaround can take longer than the doctor run)",
    )
    doctor.add_argument(
        "--seeds",
        type=int,
        default=1,
        help="also train each configuration and the referee from this many seeds and "
        "compare final accuracies with a confidence interval (default 1: lockstep only)",
    )
    doctor.add_argument(
        "--ablate-activation",
        action="store_true",
        help="run the doctor once per hidden activation (relu, sigmoid, tanh, elu) in "
        "OUT/ablation and say whether the difference follows the activation or the "
        "configuration",
    )
    doctor.add_argument(
        "--no-cache",
        action="store_true",
        help="train the referee and envelope runs even when an earlier run on this "
        "machine stored them (in $PARITY_CACHE_DIR, default ~/.cache/parity/runs)",
    )
    _add_run_options(doctor)


def _add_run_options(parser: Any) -> None:
    """Add the options that `doctor` and `run` share: configurations, output, limits."""
    parser.add_argument(
        "--configs",
        help="comma-separated configurations, such as tensorflow:cpu:graph:float32,jax:cpu:jit:float32 "
        "(default: every installed backend in each mode, and every accelerator found)",
    )
    parser.add_argument(
        "--seed",
        type=int,
        default=0,
        help="seed of the initial weights and batch order (default 0)",
    )
    parser.add_argument(
        "--fault",
        action="append",
        default=[],
        metavar="NAME[@CONFIG]",
        help="apply an emulated fault to every configuration, or to CONFIG only; repeatable. "
        "`parity faults` lists the names; module:function and file.py:function name your own",
    )
    parser.add_argument(
        "--out",
        default="parity-report",
        help="report directory (default parity-report)",
    )
    parser.add_argument(
        "--json", dest="json_path", help="also write the results as JSON to this path"
    )
    parser.add_argument(
        "--jobs",
        type=int,
        help="workers run at once, each with its share of the cores "
        "(default: CPU count, at most 4)",
    )
    parser.add_argument(
        "--timeout",
        type=float,
        help="seconds per configuration before it is stopped (default: 180 plus "
        "0.25 per training step)",
    )
    parser.add_argument(
        "--memory-limit",
        metavar="SIZE",
        help="resident memory per worker before it is stopped, such as 4GiB, 512MiB "
        "or a number of MiB; 'none' for no limit (default: three quarters of "
        "physical memory shared among --jobs, at least 2 GiB)",
    )
    parser.add_argument(
        "--resume",
        action="store_true",
        help="reuse finished results in --out whose inputs are unchanged, and run "
        "only the configurations that are missing or failed",
    )
    parser.add_argument(
        "--referee",
        help="the float64 referee configuration (default tensorflow:cpu:graph:float64)",
    )
    parser.add_argument("--no-report", action="store_true", help="skip the HTML report")
    # -v and -q are accepted after the command too; SUPPRESS keeps a value given
    # before the command when they are not repeated here.
    parser.add_argument(
        "-v",
        "--verbose",
        action="count",
        default=argparse.SUPPRESS,
        help="log more (-vv for debug)",
    )
    parser.add_argument(
        "-q",
        "--quiet",
        action="store_true",
        default=argparse.SUPPRESS,
        help="print only the verdict table",
    )


def _doctor(args: argparse.Namespace) -> int:
    from parity.doctor import DoctorOptions, run_doctor

    options = DoctorOptions(
        scenario=args.scenario,
        configs=args.configs,
        epochs=args.epochs,
        batch_size=args.batch_size,
        seed=args.seed,
        faults=args.fault,
        out=args.out,
        json_path=args.json_path,
        jobs=args.jobs,
        timeout=args.timeout,
        referee=args.referee,
        activation=args.activation,
        report=not args.no_report,
        memory_limit=args.memory_limit,
        resume=args.resume,
        localize=args.localize,
        rerun_workaround=args.rerun_workaround,
        seeds=args.seeds,
        cache=not args.no_cache,
    )
    if args.ablate_activation:
        from parity.diagnose import ablate_doctor

        return ablate_doctor(options)
    return _run_and_print(args, lambda progress: run_doctor(options, progress=progress))


def _run_and_print(args: argparse.Namespace, start: Any) -> int:
    """Run ``start(progress)`` with progress bars, print the verdicts, return the exit status."""
    from parity.runner import Interrupted
    from parity.terminal import Progress, print_summary

    try:
        with Progress(enabled=not args.quiet) as progress:
            result = start(progress.update)
    except Interrupted as interruption:
        if interruption.outcome is not None:
            print_summary(interruption.outcome)
        print(
            f"parity: stopped by {interruption.signal_name}; the results so far are in "
            f"{args.out}. Run the same command with --resume to run only what is missing.",
            file=sys.stderr,
        )
        return interruption.exit_status
    print_summary(result)
    if result.localizations or "model_diagnosis" in result.summary:
        from parity.localize import print_localization

        print_localization(result)
    bad = [
        entry
        for entry in result.summary["configs"]
        if entry["verdict"] in ("divergent", "failed")
    ]
    return 1 if bad else 0


def _add_run(commands: Any) -> None:
    from parity.api import DEFAULT_BATCH_SIZE, DEFAULT_EPOCHS

    run = commands.add_parser(
        "run",
        help="train your own Keras model on your data in lockstep on every configuration and compare",
        description="Train a Keras model on your data in lockstep on every configuration "
        "available on this machine (or those given), compare each with a float64 "
        "referee in units of round-off, and write a report. A .keras file's stored "
        "weights are the shared initial weights; a factory's model gets parity's "
        "seeded initializer.",
    )
    run.add_argument(
        "model",
        metavar="MODEL",
        help="a .keras file (loaded in safe mode), or module:function or "
        "path/to/file.py:function returning a Keras model, compiled or not",
    )
    _add_model_options(run, data_required=True)
    run.add_argument(
        "--epochs",
        type=int,
        default=DEFAULT_EPOCHS,
        help=f"epochs to train (default {DEFAULT_EPOCHS})",
    )
    run.add_argument(
        "--batch-size",
        type=int,
        default=DEFAULT_BATCH_SIZE,
        help=f"batch size (default {DEFAULT_BATCH_SIZE})",
    )
    run.add_argument(
        "--localize",
        action="store_true",
        help="after the run, localize each divergent configuration (step, layer, "
        "phase, setting, reproducer, workaround) and diagnose the model",
    )
    run.add_argument(
        "--ablate-activation",
        action="store_true",
        help="for a .keras model: run once per hidden activation (relu, sigmoid, tanh, "
        "elu) in OUT/ablation and say whether the difference follows the activation "
        "or the configuration",
    )
    _add_run_options(run)


def _run(args: argparse.Namespace) -> int:
    from parity.api import RunOptions, run_model

    options = RunOptions(
        **_model_option_values(args),
        configs=args.configs,
        epochs=args.epochs,
        batch_size=args.batch_size,
        seed=args.seed,
        faults=args.fault,
        out=args.out,
        json_path=args.json_path,
        jobs=args.jobs,
        timeout=args.timeout,
        memory_limit=args.memory_limit,
        resume=args.resume,
        referee=args.referee,
        report=not args.no_report,
    )
    if args.ablate_activation:
        from pathlib import Path

        from parity.diagnose import ablate_model_file, print_ablation

        return print_ablation(ablate_model_file(options), Path(args.out) / "ablation")
    if args.localize:
        from parity.localize import localize_result

        def run_and_localize(progress: Any) -> Any:
            result = run_model(options, progress=progress)
            localize_result(result, timeout=options.timeout)
            return result

        return _run_and_print(args, run_and_localize)
    return _run_and_print(args, lambda progress: run_model(options, progress=progress))


def _faults(args: argparse.Namespace) -> int:
    from parity.faults import CATALOGUE
    from parity.terminal import print_faults

    print_faults(CATALOGUE)
    return 0


def _add_trace_commands(commands: Any) -> None:
    """Add ``record``, ``compare`` and ``replay``: runs recorded on one machine."""
    from parity.api import DEFAULT_BATCH_SIZE, DEFAULT_EPOCHS
    from parity.record_model import MAX_STORED_DATA_BYTES

    record = commands.add_parser(
        "record",
        help="train one configuration in lockstep and write its trace file",
        description="Train a scenario, or your own model on your data, in lockstep "
        "on one configuration and write the run (settings, environment, per-step "
        "records, checkpoints, predictions, and your data when it is at most "
        f"{MAX_STORED_DATA_BYTES // 2**20} MiB) to a .parity trace, to compare on "
        "another machine.",
    )
    record.add_argument(
        "model",
        nargs="?",
        metavar="MODEL",
        help="your own model instead of a scenario: a .keras file (loaded in safe "
        "mode) or module:function or path/to/file.py:function, with --data",
    )
    record.add_argument(
        "--scenario",
        help="circles (default), moons, blobs, digits, wide (a 1100-unit layer) or "
        "large-circles (features of about 1e3); not with MODEL",
    )
    record.add_argument(
        "--config",
        required=True,
        help="the configuration to record, such as tensorflow:cpu:graph:float32",
    )
    record.add_argument(
        "-o",
        "--output",
        required=True,
        help="trace file to write: a path or an fsspec URL such as s3://bucket/laptop.parity",
    )
    record.add_argument(
        "--epochs",
        type=int,
        help=f"epochs to train (default: the scenario's, or {DEFAULT_EPOCHS} for "
        "MODEL)",
    )
    record.add_argument(
        "--batch-size",
        type=int,
        help=f"batch size (default: the scenario's, or {DEFAULT_BATCH_SIZE} for MODEL)",
    )
    record.add_argument(
        "--seed",
        type=int,
        default=0,
        help="seed of the initial weights and batch order (default 0)",
    )
    record.add_argument(
        "--activation",
        help="hidden-layer activation of the scenario's model (default relu); not "
        "with MODEL",
    )
    record.add_argument(
        "--fault",
        action="append",
        default=[],
        metavar="NAME",
        help="apply an emulated fault to the recorded run; repeatable (`parity faults` lists them)",
    )
    record.add_argument(
        "--with-referee",
        action="store_true",
        help="also record the float64 referee and the envelope runs, so that compare "
        "needs no training (for MODEL, compare trains no referee without them)",
    )
    _add_model_options(record)
    _add_trace_run_options(record)

    compare = commands.add_parser(
        "compare",
        help="give verdicts on recorded traces and show how their environments differ",
        description="Judge each recorded run against the float64 referee (from a "
        "trace that contains one, else trained here from the recorded seed), and show "
        "the environment differences item by item.",
    )
    compare.add_argument(
        "traces", nargs="+", metavar="TRACE", help="trace files or URLs"
    )
    _add_trace_report_options(compare)
    _add_trace_run_options(compare)

    replay = commands.add_parser(
        "replay",
        help="rerun a recorded run here from its initial weights and judge it",
        description="Rerun a recorded run on configurations of this machine from the "
        "trace's initial weights and batch schedule, check that the initial weights, "
        "batches and data match the trace, and judge the recorded and replayed runs "
        "together. A trace of your own model needs the model again (MODEL); parity "
        "never runs code named by a trace.",
    )
    replay.add_argument("trace", metavar="TRACE", help="the trace file or URL")
    replay.add_argument(
        "model",
        nargs="?",
        metavar="MODEL",
        help="for a trace of your own model: the recorded .keras file or factory, "
        "whose digest must match the trace",
    )
    replay.add_argument(
        "--data",
        help="for a trace of your own model: the recorded data, whose digest must "
        "match the trace (default: the data stored in the trace)",
    )
    replay.add_argument(
        "--import",
        dest="imports",
        action="append",
        default=[],
        metavar="MODULE",
        help="import MODULE before loading the model, for its custom layers; "
        "repeatable",
    )
    replay.add_argument(
        "--configs",
        help="comma-separated configurations to run here (default: the recorded ones)",
    )
    replay.add_argument(
        "--fault",
        action="append",
        default=[],
        metavar="NAME[@CONFIG]",
        help="apply an emulated fault here; repeatable. Catalogue faults recorded with "
        "a configuration are applied again to it",
    )
    replay.add_argument(
        "--localize",
        action="store_true",
        help="find the step, layer and phase where a replayed configuration diverges",
    )
    _add_trace_report_options(replay)
    _add_trace_run_options(replay)


def _add_model_options(parser: Any, data_required: bool = False) -> None:
    """Add the data and training options of a user's model (``run``, ``record MODEL``)."""
    parser.add_argument(
        "--data",
        required=data_required,
        help="a .npz file (arrays x and y), a pair x.npy,y.npy, or a .csv or .parquet "
        "table (with --target)" + ("" if data_required else "; only with MODEL"),
    )
    parser.add_argument(
        "--x", dest="x_name", default="x", help="input array name in a .npz (default x)"
    )
    parser.add_argument(
        "--y", dest="y_name", default="y", help="label array name in a .npz (default y)"
    )
    parser.add_argument(
        "--target",
        metavar="COLUMN",
        help="label column of a .csv or .parquet table; the other columns are inputs",
    )
    parser.add_argument(
        "--import",
        dest="imports",
        action="append",
        default=[],
        metavar="MODULE",
        help="import MODULE before loading the model, so that the custom layers it "
        "registers can be loaded; repeatable",
    )
    parser.add_argument(
        "--validation-split",
        type=float,
        default=0.0,
        metavar="FRACTION",
        help="fraction of rows held out of training, taken from the end as Keras' fit "
        "does; predictions on them are compared (default 0: compare predictions on "
        "the training data)",
    )
    parser.add_argument(
        "--loss",
        help="Keras loss name, such as binary_crossentropy (default: the compiled "
        "model's loss; required for a model that is not compiled)",
    )
    parser.add_argument(
        "--from-logits",
        action="store_true",
        default=None,
        help="the model outputs logits, not probabilities",
    )
    parser.add_argument(
        "--optimizer",
        help="Keras optimizer name, such as adam or sgd (default: the compiled "
        "model's optimizer, else adam)",
    )
    parser.add_argument(
        "--lr",
        dest="learning_rate",
        type=float,
        help="learning rate (default: the compiled optimizer's, else the optimizer's "
        "Keras default)",
    )
    parser.add_argument(
        "--metrics",
        help="comma-separated Keras metric names (default: the compiled model's, "
        "else accuracy for classifiers)",
    )
    parser.add_argument(
        "--allow-nonfinite",
        action="store_true",
        help="train even when the data contains NaN or inf (they are counted and "
        "reported); without it such data is rejected",
    )


def _model_option_values(args: argparse.Namespace) -> dict[str, Any]:
    """Return MODEL and the values of the options that `_add_model_options` adds."""
    return {
        "model": args.model,
        "data": args.data,
        "x_name": args.x_name,
        "y_name": args.y_name,
        "target": args.target,
        "imports": args.imports,
        "validation_split": args.validation_split,
        "loss": args.loss,
        "from_logits": args.from_logits,
        "optimizer": args.optimizer,
        "learning_rate": args.learning_rate,
        "metrics": args.metrics,
        "allow_nonfinite": args.allow_nonfinite,
    }


def _add_trace_report_options(parser: Any) -> None:
    parser.add_argument(
        "--out",
        default="parity-report",
        help="report directory (default parity-report)",
    )
    parser.add_argument(
        "--json",
        dest="json_path",
        help="write the results as JSON to this path (default: results.json in --out)",
    )
    parser.add_argument("--no-report", action="store_true", help="skip the HTML report")


def _add_trace_run_options(parser: Any) -> None:
    parser.add_argument(
        "--referee",
        help="the float64 referee configuration, when one is trained "
        "(default tensorflow:cpu:graph:float64)",
    )
    parser.add_argument(
        "--jobs",
        type=int,
        help="workers run at once, each with its share of the cores "
        "(default: CPU count, at most 4)",
    )
    parser.add_argument(
        "--timeout", type=float, help="seconds per worker before it is stopped"
    )


def _record(args: argparse.Namespace) -> int:
    from parity.record import RecordOptions, print_recording, record_run
    from parity.terminal import Progress

    options = RecordOptions(
        output=args.output,
        config=args.config,
        scenario=args.scenario,
        epochs=args.epochs,
        batch_size=args.batch_size,
        seed=args.seed,
        faults=args.fault,
        with_referee=args.with_referee,
        referee=args.referee,
        activation=args.activation,
        jobs=args.jobs,
        timeout=args.timeout,
        **_model_option_values(args),
    )
    with Progress(enabled=not args.quiet) as progress:
        result = record_run(options, progress=progress.update)
    print_recording(result)
    return 0 if all(run.ok for run in result.results) else 1


def _compare(args: argparse.Namespace) -> int:
    from parity.record import CompareOptions, compare_traces, print_comparison
    from parity.terminal import Progress

    options = CompareOptions(
        traces=args.traces,
        out=args.out,
        json_path=args.json_path,
        referee=args.referee,
        jobs=args.jobs,
        timeout=args.timeout,
        report=not args.no_report,
    )
    with Progress(enabled=not args.quiet) as progress:
        result = compare_traces(options, progress=progress.update)
    print_comparison(result)
    return 1 if result.bad else 0


def _replay(args: argparse.Namespace) -> int:
    from parity.record import ReplayOptions, print_comparison, replay_trace
    from parity.terminal import Progress

    options = ReplayOptions(
        trace=args.trace,
        configs=args.configs,
        faults=args.fault,
        referee=args.referee,
        out=args.out,
        json_path=args.json_path,
        jobs=args.jobs,
        timeout=args.timeout,
        report=not args.no_report,
        localize=args.localize,
        model=args.model,
        data=args.data,
        imports=args.imports,
    )
    with Progress(enabled=not args.quiet) as progress:
        result = replay_trace(options, progress=progress.update)
    print_comparison(result)
    return 1 if result.bad else 0


def build_parser() -> argparse.ArgumentParser:
    """Return the argument parser of the ``parity`` command."""
    from parity import __version__

    parser = argparse.ArgumentParser(
        prog="parity",
        description="Check that a model computes and trains the same on every backend, device and compiler.",
    )
    parser.add_argument("--version", action="version", version=f"parity {__version__}")
    parser.add_argument(
        "-v", "--verbose", action="count", default=0, help="log more (-vv for debug)"
    )
    parser.add_argument(
        "-q", "--quiet", action="store_true", help="print only the verdict table"
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    _add_doctor(commands)
    _add_run(commands)
    _add_trace_commands(commands)
    commands.add_parser("faults", help="list the emulated faults")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the command line; return the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    level = logging.WARNING - 10 * args.verbose if not args.quiet else logging.ERROR
    level = max(logging.DEBUG, level)
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    # basicConfig does nothing when logging is already set up (a second in-process
    # call, an embedding program), so the parity logger gets the level directly.
    log.setLevel(level)
    if args.command is None:
        parser.print_help()
        return 0
    handlers = {
        "doctor": _doctor,
        "run": _run,
        "record": _record,
        "compare": _compare,
        "replay": _replay,
        "faults": _faults,
    }
    try:
        return handlers[args.command](args)
    except ParityError as error:
        print(f"parity: error: {error}", file=sys.stderr)
        return 2
    except OSError as error:
        # Output paths are checked before training, so this is a failure while
        # running (a full disk, a file removed under parity), not invalid input.
        log.debug("stopped by an operating system error", exc_info=True)
        print(f"parity: error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("parity: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
