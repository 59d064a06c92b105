"""The fixed, parseable answer format: `<entity>: <rationale> [SEG]`.

The entity names the Slicer segment and serves later references ("the liver lesion"). Training data,
the model's generated answers and the engine all go through these functions.

An absent target (a structure the slice does not show) is answered `<entity>: not on this slice.` without
`[SEG]` (data/absent.py trains this wording): the engine then draws no segment (`says_absent`).
"""

from __future__ import annotations

import re

SEG_TOKEN = "[SEG]"
ABSENT_TEXT = "not on this slice"  # the same words as data/absent.py (tests/test_absent_answers.py checks it)
ABSENT_NOTE = "no segment: the model says this structure is not on this slice"
_ENTITY_RE = re.compile(r"^\s*([A-Za-z][A-Za-z0-9 '\-/]*?)\s*:")


def format_answer(entity: str, rationale: str) -> str:
    """Answer text for a round that segments `entity`; the rationale is one short sentence."""
    entity = " ".join(entity.strip().split())
    rationale = " ".join(rationale.strip().split()).rstrip(".")
    if not entity or ":" in entity:
        raise ValueError(f"entity name {entity!r} must be non-empty and contain no ':'")
    return f"{entity}: {rationale}. {SEG_TOKEN}"


def parse_entity(answer: str) -> str | None:
    """The entity named by an answer, or None when the answer does not follow the format."""
    match = _ENTITY_RE.match(answer or "")
    return match.group(1).strip().lower() if match else None


def strip_seg(answer: str) -> str:
    """Answer text without the `[SEG]` marker, for display."""
    return answer.replace(SEG_TOKEN, "").strip()


def says_absent(answer: str) -> bool:
    """The model's answer says its target is not on the slice (and does not ask for a segment)."""
    text = " ".join((answer or "").lower().split())
    return SEG_TOKEN.lower() not in text and ABSENT_TEXT in text
