"""Tokens saved at equal perplexity: the paper's headline figure, read off the validation curves a run writes.

A run's validation curve is its 'lm loss validation ppl' scalar against the 'tokens' scalar (tokens seen, both
stepped by iteration; training/logging.py writes them to --tensorboard-dir): one point per --eval-interval, and one
at the end of training.

Given a reference run R (NTP) and a candidate C (CoCoMix, KD, ...), with final validation perplexities P_R, P_C
reached at T_R, T_C tokens:

- The candidate reaches P_R: T_C* = the tokens at which C's curve first reaches P_R, and the saving is
  1 - T_C* / T_R ("CoCoMix reaches NTP's final perplexity with 21.5% fewer tokens"; negative when C needed more,
  which can only happen when C trained longer than R).
- It does not ("not reached": C's curve stays above P_R, C is behind): the other direction. T_R* = the tokens at
  which R's curve first reaches P_C, and C needs T_C / T_R* - 1 more tokens than R for the same perplexity.

"First reaches" is the first evaluation at or below the target, the crossing interpolated between it and the
evaluation before it with the perplexity taken as linear in log tokens:

    log T* = log t0 + (p0 - P) / (p0 - p1) * (log t1 - log t0)

A crossing at a curve's first evaluation lies somewhere before it, so the number becomes a bound (`bound`: the
saving is "at least", or the extra tokens "at most"). Each curve needs at least MIN_EVALUATIONS evaluations: with
fewer there is nothing to interpolate between before the end, and the figure would be the ratio of the runs'
lengths. The comparison is meaningful only when both runs validate on the same documents with the same settings
(data, --split, --seq-length, --eval-iters x --global-batch-size, tokenizer): the curves must measure the same
thing. See docs/tokens_saved.md.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

VALID_PPL_TAG = "lm loss validation ppl"
TOKENS_TAG = "tokens"
MIN_EVALUATIONS = 3

Curve = List[Tuple[float, float]]  # [(tokens seen, validation perplexity)], tokens increasing


def read_scalars(folder: str) -> Dict[str, Dict[int, float]]:
    """{tag: {step: value}} of every scalar in the event files of `folder` (the last value of a repeated step:
    a resumed run re-logs the iterations after its checkpoint)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(folder, size_guidance={"scalars": 0})
    events.Reload()
    return {tag: {e.step: e.value for e in events.Scalars(tag)} for tag in events.Tags()["scalars"]}


def validation_curve(scalars: Dict[str, Dict[int, float]], name: str) -> Curve:
    """The run's validation perplexity against tokens seen, at every evaluation whose iteration has a 'tokens'
    value; raises a one-line ValueError naming the run when it has fewer than MIN_EVALUATIONS."""
    tokens = scalars.get(TOKENS_TAG, {})
    points = sorted((float(tokens[step]), float(ppl)) for step, ppl in scalars.get(VALID_PPL_TAG, {}).items()
                    if step in tokens)
    if len(points) < MIN_EVALUATIONS:
        found = f"{len(points)} evaluation{'s' if len(points) != 1 else ''}"
        raise ValueError(f"{name}: {found} of '{VALID_PPL_TAG}' with a '{TOKENS_TAG}' value; tokens saved needs at "
                         f"least {MIN_EVALUATIONS} (a smaller --eval-interval validates more often)")
    if points[0][0] <= 0 or any(t1 <= t0 for (t0, _), (t1, _) in zip(points, points[1:])):
        raise ValueError(f"{name}: the evaluations' '{TOKENS_TAG}' values are not positive and increasing")
    return points


def read_curve(folder: str, name: Optional[str] = None) -> Curve:
    """validation_curve of the event files in `folder` (a run's --tensorboard-dir)."""
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"{folder}: no such directory")
    return validation_curve(read_scalars(folder), name or folder)


def tokens_to_reach(curve: Curve, ppl: float) -> Optional[Tuple[float, bool]]:
    """(tokens, bound) at which the curve first reaches `ppl` (at or below), interpolated as the module says;
    bound is True when that is its first evaluation (the crossing lies before it). None: never reached."""
    for index, (tokens, value) in enumerate(curve):
        if value > ppl:
            continue
        if index == 0:
            return tokens, True
        t0, p0 = curve[index - 1]
        fraction = (p0 - ppl) / (p0 - value)
        return math.exp(math.log(t0) + fraction * (math.log(tokens) - math.log(t0))), False
    return None


@dataclass(frozen=True)
class TokensSaved:
    reference: str
    candidate: str
    reference_final: Tuple[float, float]   # (tokens, ppl) of the reference's last evaluation
    candidate_final: Tuple[float, float]
    reached: bool          # the candidate reaches the reference's final perplexity
    target_ppl: float      # P_R when reached, else P_C
    reference_tokens: float  # tokens at which the reference has target_ppl: T_R, or T_R* (interpolated)
    candidate_tokens: float  # T_C* (interpolated), or T_C
    bound: bool            # a crossing at a first evaluation: the figure is a bound

    @property
    def saving(self) -> float:
        """The fraction of the reference's tokens the candidate saves at target_ppl (negative: it needs more)."""
        return 1.0 - self.candidate_tokens / self.reference_tokens

    def sentence(self) -> str:
        """One line: what was compared, at which tokens, and the saving or the extra tokens."""
        ref, cand = self.reference, self.candidate
        ref_tokens, ref_ppl = self.reference_final
        cand_tokens, cand_ppl = self.candidate_final
        if self.reached:
            more = self.saving < 0
            amount = f"{100 * abs(self.saving):.1f}% {'more' if more else 'fewer'}"
            if self.bound:
                amount = ("at most " if more else "at least ") + amount
            at = ("by its first evaluation, " if self.bound else "at ") + format_tokens(self.candidate_tokens)
            return (f"{cand} reaches {ref}'s final validation perplexity {ref_ppl:.2f} {at} tokens: {amount} "
                    f"tokens than {ref} ({format_tokens(ref_tokens)}).")
        extra = self.candidate_tokens / self.reference_tokens - 1.0
        at = ("by its first evaluation, " if self.bound else "at ") + format_tokens(self.reference_tokens)
        amount = f"{'at least ' if self.bound else ''}{100 * extra:.1f}% more"
        if extra < 0:  # the candidate trained for fewer tokens than the reference and is ahead at equal tokens
            amount = f"{'at most ' if self.bound else ''}{100 * -extra:.1f}% fewer"
        return (f"{cand} does not reach {ref}'s final validation perplexity {ref_ppl:.2f} (not reached; its own: "
                f"{cand_ppl:.2f} at {format_tokens(cand_tokens)} tokens); {ref} reached {cand_ppl:.2f} {at} "
                f"tokens: {cand} needs {amount} tokens.")


def tokens_saved(reference: str, reference_curve: Curve, candidate: str, candidate_curve: Curve) -> TokensSaved:
    """The comparison the module describes, of two curves from validation_curve."""
    for name, curve in ((reference, reference_curve), (candidate, candidate_curve)):
        if len(curve) < MIN_EVALUATIONS:
            raise ValueError(f"{name}: {len(curve)} evaluations; tokens saved needs at least {MIN_EVALUATIONS}")
    ref_final, cand_final = reference_curve[-1], candidate_curve[-1]
    crossing = tokens_to_reach(candidate_curve, ref_final[1])
    if crossing is not None:
        tokens, bound = crossing
        return TokensSaved(reference, candidate, ref_final, cand_final, True, ref_final[1], ref_final[0], tokens,
                           bound)
    # The candidate stays above P_R, so P_C > P_R and the reference reaches P_C by its last evaluation.
    tokens, bound = tokens_to_reach(reference_curve, cand_final[1])
    return TokensSaved(reference, candidate, ref_final, cand_final, False, cand_final[1], tokens, cand_final[0],
                       bound)


def compare(reference: str, curves: Dict[str, Curve], candidates: Optional[Sequence[str]] = None) -> List[TokensSaved]:
    """tokens_saved of every other run (or `candidates`) against `reference`, in order."""
    if reference not in curves:
        raise ValueError(f"reference {reference!r}: not one of the runs ({', '.join(curves)})")
    names = [n for n in (candidates or curves) if n != reference]
    return [tokens_saved(reference, curves[reference], name, curves[name]) for name in names]


def summary_lines(comparisons: Sequence[TokensSaved]) -> List[str]:
    """A heading line, then one markdown list item per compared run."""
    if not comparisons:
        return []
    return [f"Tokens saved at equal validation perplexity, against {comparisons[0].reference} "
            f"(docs/tokens_saved.md):"] + [f"- {c.sentence()}" for c in comparisons]


def format_tokens(n: float) -> str:
    for unit, size in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.2f}{unit}"
    return f"{n:.0f}"
