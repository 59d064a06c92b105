"""Rounds inserted into a generated dialogue (absent targets, data/absent.py; repeats, data/repeats.py; bare
requests, data/bare_requests.py; lesions asked in organs without one, data/empty_containers.py): one
builder keeps true everything that names a round — references, "round N" in answers and queries ("… from
round 2", "the one from round 3": an answer that cited round 2 must cite the same round at its new number, or
the model learns to cite and follow wrong rounds), and the per-round flags in `meta`."""

from __future__ import annotations

import copy
import re

import numpy as np

PER_ROUND_FLAGS = ("absent", "repeat", "bare")
_ITS_OWN = object()  # `keep`: the round's own reference
_ROUND = re.compile(r"\b(round )(\d+)\b")


def renumber(text: str, new_number: dict[int, int]) -> str:
    """`text` with every "round N" whose N is a key of `new_number` (1-based old → new) rewritten."""
    return _ROUND.sub(lambda m: m.group(1) + str(new_number.get(int(m.group(2)), int(m.group(2)))), text)


class InsertedRounds:
    """A new dialogue built from `sample`'s rounds (`keep`) and inserted ones (`insert`), in order."""

    def __init__(self, sample):
        self.sample = sample
        self.queries, self.answers, self.entities, self.refs, self.masks = [], [], [], [], []
        self.flags = {key: [] for key in PER_ROUND_FLAGS}
        self._old_flags = {key: list((sample.meta or {}).get(key) or [False] * sample.num_rounds)
                           for key in PER_ROUND_FLAGS}
        self._new_index: dict[int, int] = {}  # old round (0-based) → new
        self._numbers: dict[int, int] = {}  # old round number → new (1-based)

    def __len__(self) -> int:
        return len(self.queries)

    def keep(self, k: int, ref: int | None | object = _ITS_OWN) -> None:
        """Append the sample's round k: its reference (or `ref`, another of the sample's rounds before it) and
        cited round numbers follow the renumbering."""
        s = self.sample
        self._new_index[k] = len(self)
        self._numbers[k + 1] = len(self) + 1
        ref = s.ref_indices[k] if ref is _ITS_OWN else ref
        self._append(renumber(s.queries[k], self._numbers), renumber(s.answers[k], self._numbers), s.entities[k],
                     None if ref is None else self._new_index[ref], s.masks[k],
                     {key: self._old_flags[key][k] for key in PER_ROUND_FLAGS})

    def new_index(self, k: int) -> int:
        """The new (0-based) index of the sample's round k, kept already."""
        return self._new_index[k]

    def insert(self, query: str, answer: str, entity: str | None, ref: int | None, mask, **flags) -> None:
        """Append a new round; `ref` is a new (0-based) index; `flags` among PER_ROUND_FLAGS (default False)."""
        unknown = set(flags) - set(PER_ROUND_FLAGS)
        if unknown:
            raise ValueError(f"unknown round flags {sorted(unknown)}")
        self._append(query, answer, entity, ref, mask, {key: bool(flags.get(key, False)) for key in PER_ROUND_FLAGS})

    def _append(self, query, answer, entity, ref, mask, flags) -> None:
        self.queries.append(query)
        self.answers.append(answer)
        self.entities.append(entity)
        self.refs.append(ref)
        self.masks.append(np.asarray(mask, bool))
        for key in PER_ROUND_FLAGS:
            self.flags[key].append(flags[key])

    def build(self, *flag_keys: str):
        """A copy of the sample with these rounds; `meta` gets the flags named (and keeps aligned those it had)."""
        out = copy.copy(self.sample)
        out.queries, out.answers, out.entities, out.ref_indices = self.queries, self.answers, self.entities, self.refs
        out.masks = np.stack(self.masks)
        out.meta = dict(self.sample.meta or {})
        for key in PER_ROUND_FLAGS:
            if key in flag_keys or key in out.meta:
                out.meta[key] = list(self.flags[key])
        return out
