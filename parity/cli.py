"""The ``parity`` command line: ``parity doctor`` and ``parity faults``.

Exit status: 0 when every configuration that ran is consistent or roundoff, 1 when
any is divergent or failed, 2 for invalid input (the message names the value and
the fix).
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
        help="circles (default), moons, blobs or digits",
    )
    doctor.add_argument(
        "--configs",
        help="comma-separated configurations, such as tensorflow:cpu:graph:float32,jax:cpu:jit:float32 "
        "(default: every installed backend in each mode, and every accelerator found)",
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
        "--seed",
        type=int,
        default=0,
        help="seed of the initial weights and batch order (default 0)",
    )
    doctor.add_argument(
        "--fault",
        action="append",
        default=[],
        metavar="NAME[@CONFIG]",
        help="apply an emulated fault to every configuration, or to CONFIG only; repeatable. "
        "`parity faults` lists the names; module:function and file.py:function name your own",
    )
    doctor.add_argument(
        "--out",
        default="parity-report",
        help="report directory (default parity-report)",
    )
    doctor.add_argument(
        "--json", dest="json_path", help="also write the results as JSON to this path"
    )
    doctor.add_argument(
        "--jobs", type=int, help="workers run at once (default: CPU count, at most 4)"
    )
    doctor.add_argument(
        "--timeout", type=float, help="seconds per configuration before it is stopped"
    )
    doctor.add_argument(
        "--referee",
        help="the float64 referee configuration (default tensorflow:cpu:graph:float64)",
    )
    doctor.add_argument(
        "--activation",
        default="relu",
        help="hidden-layer activation of the scenario's model",
    )
    doctor.add_argument("--no-report", action="store_true", help="skip the HTML report")


def _doctor(args: argparse.Namespace) -> int:
    from parity.doctor import DoctorOptions, run_doctor
    from parity.terminal import Progress, print_summary

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
    )
    with Progress(enabled=not args.quiet) as progress:
        result = run_doctor(options, progress=progress.update)
    print_summary(result)
    bad = [
        entry
        for entry in result.summary["configs"]
        if entry["verdict"] in ("divergent", "failed")
    ]
    return 1 if bad else 0


def _faults(args: argparse.Namespace) -> int:
    from parity.faults import CATALOGUE
    from parity.terminal import print_faults

    print_faults(CATALOGUE)
    return 0


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
    commands.add_parser("faults", help="list the emulated faults")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the command line; return the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    level = logging.WARNING - 10 * args.verbose if not args.quiet else logging.ERROR
    logging.basicConfig(
        level=max(logging.DEBUG, level), format="%(levelname)s %(name)s: %(message)s"
    )
    if args.command is None:
        parser.print_help()
        return 0
    handlers = {"doctor": _doctor, "faults": _faults}
    try:
        return handlers[args.command](args)
    except ParityError as error:
        print(f"parity: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("parity: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
