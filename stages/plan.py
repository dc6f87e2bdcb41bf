"""The cascade's order: which stage models which slice, after which, and what its context reads.

    first_slice  MSB slice 0                      reads nothing
    size_spn     MSB slices 1 .. S*S-1, in order  reads the MSB slices before its target
    depth_spn    LSB slices 0 .. S*S-1, in order  reads every MSB slice and the LSB slices before its target

(paper, sections 3.2 and 3.3: a slice's meta-position k is its place in the order). Sampling draws,
scoring sums, the codec codes and the pictures show the slices in the order of `plan`, and the stages
take the slices they model from here (`SubscaleStage.modelled_slices`) and what their contexts read of
their own part (`known_before`, `SubscaleStage.known_mask`): a new order is written here only. Each
stage's `context_stack` builds READS; tests/test_stages.py holds every stage's context to READS. Free
of torch, so that the command line reads it without loading the networks.
"""
from __future__ import annotations

from typing import Iterable, NamedTuple

ORDER = ("first_slice", "size_spn", "depth_spn")  # the stages, in the order they draw
PART = {"first_slice": "msb", "size_spn": "msb", "depth_spn": "lsb"}  # the part of the image each one models
READS = {"first_slice": (), "size_spn": ("msb",), "depth_spn": ("msb", "lsb")}  # the parts its context reads
SLICES = {"first_slice": lambda S: [0], "size_spn": lambda S: list(range(1, S**2)),  # the slices it models,
          "depth_spn": lambda S: list(range(S**2))}  # in the order it draws them, for S = subscale


class Step(NamedTuple):
    """One slice of the cascade's order: `stage` models slice k (its meta-position) of `part` ("msb" or
    "lsb"), given the parts in `reads` (of its own part, the slices before k only)."""

    stage: str
    part: str
    k: int
    reads: tuple[str, ...]


def cascade_stages(subscale: int, bits: int, high_bits: int) -> list[str]:
    """The stages of a cascade of this geometry, in ORDER: no size SPN when S = 1 (the first slice is the
    whole image), no depth SPN when b = n (no low bits)."""
    return [stage for stage in ORDER
            if (stage != "size_spn" or subscale > 1) and (stage != "depth_spn" or high_bits < bits)]


def modelled_slices(stage: str, subscale: int) -> list[int]:
    """The slice ids k that `stage` models, in the order it draws them, for S = `subscale`; raises
    KeyError for a name not in ORDER."""
    return SLICES[stage](subscale)


def plan(stages: Iterable[str], subscale: int) -> list[Step]:
    """Every slice that the stages `stages` (names; any order) model, in the cascade's order; raises
    ValueError for a name not in ORDER."""
    chosen = set(stages)
    if chosen - set(ORDER):
        raise ValueError(f"unknown stage {', '.join(sorted(chosen - set(ORDER)))}: the stages are {', '.join(ORDER)}")
    return [Step(stage, PART[stage], k, READS[stage]) for stage in ORDER if stage in chosen
            for k in modelled_slices(stage, subscale)]


def known_before(part: str, k: int, subscale: int) -> list[int]:
    """The slice ids of `part` ("msb" or "lsb") drawn before slice k of that part, in the order of `plan`:
    what a context reads of its own part. Raises ValueError when no stage models slice k of `part`."""
    before = []
    for step in plan(ORDER, subscale):
        if step.part == part:
            if step.k == k:
                return before
            before.append(step.k)
    raise ValueError(f"no stage models slice {k} of the {part} part at subscale {subscale}")


def known_after(steps: Iterable[Step], given: dict[str, Iterable[int]] | None = None) -> dict[str, set[int]]:
    """{"msb": slice ids, "lsb": slice ids} known once `steps` are done, on top of `given` (same form)."""
    known = {part: set((given or {}).get(part, ())) for part in ("msb", "lsb")}
    for step in steps:
        known[step.part].add(step.k)
    return known
