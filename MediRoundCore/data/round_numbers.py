"""Round numbers inside dialogue text ("… from round 2", "the one from round 3") kept true when rounds are
inserted into a generated dialogue (data/absent.py, data/repeats.py): an answer or query that cited round 2
must cite the same round at its new number, or the model learns to cite and follow wrong rounds."""

from __future__ import annotations

import re

_ROUND = re.compile(r"\b(round )(\d+)\b")


def renumber(text: str, new_number: dict[int, int]) -> str:
    """`text` with every "round N" whose N is a key of `new_number` (1-based old → new) rewritten."""
    return _ROUND.sub(lambda m: m.group(1) + str(new_number.get(int(m.group(2)), int(m.group(2)))), text)
