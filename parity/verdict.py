"""Trajectory verdicts: each configuration's distance to the referee, in units of round-off.

The referee trains in float64 on the CPU. Envelope runs train in float32 from
initial weights moved by one unit in the last place. They show how far a correct
float32 run drifts from the referee, step by step. A candidate's *excess* at a step
is its distance to the referee divided by that envelope. Round-off keeps the excess
near one; a faulty kernel puts it orders of magnitude higher.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from parity.lockstep import relative_distance
from parity.runner import RunResult

VERDICTS = ("consistent", "roundoff", "divergent", "failed", "not-run")

FLOAT32_UNIT_ROUNDOFF = 2.0**-24

# Unit round-off of the arithmetic that each precision policy computes in.
UNIT_ROUNDOFF = {
    "float64": 2.0**-53,
    "float32": FLOAT32_UNIT_ROUNDOFF,
    "mixed_float16": 2.0**-11,
    "float16": 2.0**-11,
    "mixed_bfloat16": 2.0**-8,
    "bfloat16": 2.0**-8,
}

# Smallest envelope, as a relative parameter distance in float32 units of round-off,
# so that a step where the envelope runs happen to match the referee exactly does
# not turn a one-ulp difference into a huge excess.
ENVELOPE_FLOOR_UNITS = 1.0

# A candidate is divergent when its distance to the referee exceeds the envelope by
# more than this factor at some step. Evidence, on a 2-core x86-64 CPU: correct CPU
# configurations of TensorFlow, JAX and PyTorch reached a max excess of 1.3 in the
# default 100-epoch circles run. Over 35 correct short runs of four scenarios in
# benchmarks/detection.py they reached at most 1.11. The smallest excess of a
# detected fault there was 72.3 (adam-epsilon on blobs); fused-dense-relu reaches
# about 1e6 at step 1. See docs/benchmarks.md.
DIVERGENT_EXCESS = 30.0

# Correct float32 runs drift apart chaotically late in training: the step at which
# a rounding difference is amplified varies by a few hundred steps between runs.
# The envelope at a step is therefore the largest envelope distance up to this
# fraction of the run (at least one epoch) later.
ENVELOPE_LOOKAHEAD = 0.1

# Largest fraction of grid points (or data points) whose predicted class may differ
# from the referee's for a configuration to be called consistent rather than
# roundoff: 10 of a 100x100 grid, which points on the boundary itself can flip.
CONSISTENT_MAX_DISAGREEMENT = 0.001


@dataclasses.dataclass
class Judgement:
    """The verdict on one configuration, with the measured values behind it."""

    verdict: str
    reason: str
    excess: float | None = None
    first_divergent_step: int | None = None
    max_distance: float | None = None
    boundary_disagreement: float | None = None
    disagreement_on: str | None = None
    first_nonfinite_step: int | None = None
    distance: np.ndarray | None = None
    envelope: np.ndarray | None = None

    def to_dict(self) -> dict[str, Any]:
        """Return the JSON fields of the judgement (without per-step arrays)."""
        return {
            "verdict": self.verdict,
            "reason": self.reason,
            "excess": self.excess,
            "first_divergent_step": self.first_divergent_step,
            "first_nonfinite_step": self.first_nonfinite_step,
            "max_distance": self.max_distance,
            "boundary_disagreement": self.boundary_disagreement,
            "disagreement_on": self.disagreement_on,
        }


def predicted_classes(probabilities: np.ndarray) -> np.ndarray:
    """Return class indices from sigmoid (one column) or softmax outputs."""
    p = np.asarray(probabilities, np.float64)
    if p.ndim == 1 or p.shape[-1] == 1:
        return (p.reshape(len(p), -1)[:, 0] > 0.5).astype(np.int64)
    return np.argmax(p, axis=-1)


def disagreement(
    candidate: RunResult, referee: RunResult
) -> tuple[float | None, str | None]:
    """Return the fraction of grid (or data) points whose class differs from the referee's."""
    for key, where in (("predictions/grid", "grid"), ("predictions/data", "data")):
        if key in candidate.arrays and key in referee.arrays:
            ours = predicted_classes(candidate.arrays[key])
            theirs = predicted_classes(referee.arrays[key])
            if ours.shape == theirs.shape:
                return float(np.mean(ours != theirs)), where
    return None, None


def envelope_curve(
    envelope_runs: list[RunResult], referee: RunResult, steps_per_epoch: int
) -> np.ndarray | None:
    """Return the round-off envelope per step, or None without usable envelope runs."""
    curves = [
        relative_distance(run.arrays["steps/digest"], referee.arrays["steps/digest"])
        for run in envelope_runs
        if run.ok
        and run.arrays["steps/digest"].shape == referee.arrays["steps/digest"].shape
    ]
    if not curves:
        return None
    raw = np.nan_to_num(np.max(curves, axis=0), nan=np.inf)
    lookahead = max(steps_per_epoch, int(ENVELOPE_LOOKAHEAD * len(raw)))
    padded = np.concatenate([raw, np.full(lookahead, raw[-1])])
    # Running maximum over each step and the lookahead window after it.
    running = np.maximum.accumulate(padded)
    return running[lookahead:]


def first_nonfinite(run: RunResult) -> int | None:
    """Return the first step whose loss or parameters are not finite, or None."""
    loss = run.arrays["steps/loss"]
    digest = run.arrays["steps/digest"][1:]
    bad = ~np.isfinite(loss) | ~np.all(np.isfinite(digest), axis=1)
    return int(np.argmax(bad)) if bad.any() else None


def judge(
    candidate: RunResult, referee: RunResult | None, envelope: np.ndarray | None
) -> Judgement:
    """Give a candidate its verdict from its distance to the referee and the envelope."""
    if candidate.status != "ok":
        verdict = "not-run" if candidate.status == "not-run" else "failed"
        return Judgement(verdict, candidate.error or verdict)
    if referee is None or not referee.ok:
        return Judgement("failed", "no verdict: the float64 referee did not finish")
    if envelope is None:
        return Judgement("failed", "no verdict: no envelope run finished")
    ours, theirs = candidate.arrays["steps/digest"], referee.arrays["steps/digest"]
    if ours.shape != theirs.shape:
        return Judgement(
            "failed",
            f"no verdict: {ours.shape[0] - 1} steps and {ours.shape[1]} digest values, "
            f"the referee has {theirs.shape[0] - 1} and {theirs.shape[1]}",
        )

    distance = relative_distance(ours, theirs)
    precision = candidate.run.config.precision
    scale = UNIT_ROUNDOFF.get(precision, FLOAT32_UNIT_ROUNDOFF) / FLOAT32_UNIT_ROUNDOFF
    allowed = np.maximum(envelope, ENVELOPE_FLOOR_UNITS * FLOAT32_UNIT_ROUNDOFF) * scale
    excess = distance / allowed
    excess[0] = 0.0 if distance[0] == 0 else excess[0]
    fraction, where = disagreement(candidate, referee)
    finite = np.isfinite(excess)
    judgement = Judgement(
        "roundoff",
        "",
        # A run that went non-finite has no meaningful largest excess: the finite
        # steps before it would understate it.
        excess=float(np.max(excess)) if finite.all() else None,
        max_distance=float(np.max(distance[finite])) if finite.any() else None,
        boundary_disagreement=fraction,
        disagreement_on=where,
        distance=distance,
        envelope=allowed,
    )

    nonfinite_step = first_nonfinite(candidate)
    if nonfinite_step is not None and first_nonfinite(referee) != nonfinite_step:
        judgement.verdict = "divergent"
        judgement.first_nonfinite_step = nonfinite_step
        judgement.first_divergent_step = nonfinite_step
        judgement.reason = f"non-finite loss or parameters first at step {nonfinite_step}; the referee stays finite"
        return judgement
    above = np.flatnonzero(excess > DIVERGENT_EXCESS)
    described = _describe_disagreement(fraction, where)
    largest = (
        "not finite, as the referee's"
        if judgement.excess is None
        else f"{judgement.excess:.3g}x"
    )
    if above.size:
        step = int(above[0])
        judgement.verdict = "divergent"
        judgement.first_divergent_step = step
        judgement.reason = (
            f"passes {DIVERGENT_EXCESS:g}x the round-off envelope at step {step} "
            f"(excess {excess[step]:.3g}x; max {largest}); {described}"
        )
    elif fraction is not None and fraction <= CONSISTENT_MAX_DISAGREEMENT:
        judgement.verdict = "consistent"
        judgement.reason = (
            f"below {DIVERGENT_EXCESS:g}x the round-off envelope (max excess "
            f"{largest}); {described}"
        )
    else:
        judgement.reason = (
            f"below {DIVERGENT_EXCESS:g}x the round-off envelope (max excess "
            f"{largest}), "
            f"but chaotic drift changes the result: {described}"
        )
    return judgement


def _describe_disagreement(fraction: float | None, where: str | None) -> str:
    if fraction is None:
        return "no predictions to compare"
    noun = "grid points" if where == "grid" else "data points"
    return f"{100 * fraction:.2f}% of {noun} classified differently"
