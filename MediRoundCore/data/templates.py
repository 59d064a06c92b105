"""Query paraphrase templates for the five MR-MedSeg relation types (and direct first-round naming).

Each pool has 20 templates. Every fifth one (index % 5 == 4) is RESERVED: it is used only in
validation and test splits, never in training, so evaluation sees phrasings the model never trained on.
"""

from __future__ import annotations

import re

RELATIONS = ("lesion", "hierarchy", "attribute", "spatial", "inferential")

TEMPLATES: dict[str, tuple[str, ...]] = {
    "direct": (
        "Segment the {name}.",
        "Please segment the {name} in this image.",
        "Can you outline the {name}?",
        "Show me where the {name} is.",
        "Delineate the {name} on this slice.",
        "I need a mask of the {name}.",
        "Where is the {name}? Please segment it.",
        "Highlight the {name}.",
        "Mark the {name} for me.",
        "Give me the contour of the {name}.",
        "Could you segment the {name} here?",
        "Find the {name} and segment it.",
        "Please draw the outline of the {name}.",
        "Identify the {name} in this scan.",
        "Produce a segmentation of the {name}, please.",
        "Let's start with the {name}.",
        "First, segment the {name}.",
        "Locate the {name}.",
        "Mask out the {name}.",
        "Trace the boundary of the {name} on this image.",
    ),
    # organ -> lesion dependency; {lesion} is "cyst", "nodule", "larger lesion", ...
    "lesion": (
        "Now segment the {lesion} inside it.",
        "Segment the {lesion} within it.",
        "Show me the {lesion} that lies in it.",
        "Now the {lesion} inside it.",
        "Outline the {lesion} contained in this structure.",
        "Please delineate the {lesion} located inside it.",
        "Where is the {lesion} in it? Segment it.",
        "Segment the {lesion} that this structure contains.",
        "Find the {lesion} inside that structure and mask it.",
        "Inside the referenced structure, isolate the {lesion}.",
        "Mark the {lesion} it harbours.",
        "Next, the {lesion} in it, please.",
        "Highlight the {lesion} inside it.",
        "Can you segment the {lesion} found in it?",
        "Which part of it is the {lesion}? Give me its mask.",
        "Segment the {lesion} sitting within it.",
        "Now show the {lesion} that is inside it.",
        "Please outline the {lesion} within this structure.",
        "Give me a mask of the {lesion} in it.",
        "Pick out the {lesion} embedded in that structure.",
    ),
    # whole -> part; {part} is "renal pelvis", "tumour core", "oedema", "spinal canal", ...
    "hierarchy": (
        "Segment the {part} of it.",
        "Now segment its {part}.",
        "Show me the {part} of this structure.",
        "Which region of it is the {part}? Segment it.",
        "Zoom in on the {part} that forms part of it and segment that.",
        "Please outline the {part} belonging to it.",
        "Within it, segment the {part}.",
        "Now its {part}, please.",
        "Delineate the {part} that is part of it.",
        "Break it down: isolate its {part}.",
        "Highlight the {part} of that structure.",
        "Mark the {part} inside it.",
        "Give me the mask of its {part}.",
        "Can you segment the {part} of it?",
        "Of this structure, keep only the {part}.",
        "Segment just the {part} of it.",
        "Find the {part} that belongs to it.",
        "Now the {part} of the same structure.",
        "Outline its {part}.",
        "Restrict the mask to the {part} of that structure.",
    ),
    # attribute association; {noun} "solid organ", {which} "with the same density as it" / "that is larger than it"
    "attribute": (
        "Segment the other {noun} {which}.",
        "Now the {noun} {which}.",
        "Show me the {noun} {which}.",
        "Find the {noun} {which} and segment it.",
        "Compare with it and pick out the {noun} {which}.",
        "Please outline the {noun} {which}.",
        "Segment the {noun} {which}, please.",
        "Can you delineate the {noun} {which}?",
        "Highlight the {noun} {which}.",
        "By analogy with it, segment the {noun} {which}.",
        "Next, mask the {noun} {which}.",
        "Mark the {noun} {which}.",
        "Give me the {noun} {which}.",
        "Now show the {noun} {which}.",
        "Using it as the reference, isolate the {noun} {which}.",
        "Locate the {noun} {which}.",
        "Segment the {noun} {which} as well.",
        "I also need the {noun} {which}.",
        "Outline the {noun} {which} too.",
        "Taking it as a yardstick, delineate the {noun} {which}.",
    ),
    # spatial relationship; {rel} "to the patient's left of it", "in front of it", "next to it", ...
    "spatial": (
        "Segment the {noun} {rel}.",
        "Now the {noun} {rel}.",
        "Show me the {noun} {rel}.",
        "Find the {noun} {rel} and segment it.",
        "Looking around it, pick out the {noun} {rel}.",
        "Please outline the {noun} {rel}.",
        "Which {noun} lies {rel}? Segment it.",
        "Can you delineate the {noun} {rel}?",
        "Highlight the {noun} lying {rel}.",
        "Relative to it, isolate the {noun} {rel}.",
        "Next, mask the {noun} {rel}.",
        "Mark the {noun} that sits {rel}.",
        "Give me the {noun} {rel}.",
        "Now show the {noun} located {rel}.",
        "Moving from it, segment the {noun} {rel}.",
        "Locate the {noun} {rel}.",
        "Segment the {noun} positioned {rel}.",
        "I also need the {noun} {rel}.",
        "Outline the {noun} {rel} too.",
        "Using its position, delineate the {noun} {rel}.",
    ),
    # inferential reasoning; {desc} "organ that stores bile", "organ that filters blood ... on the same side as it"
    "inferential": (
        "Segment the {desc}.",
        "Now segment the {desc}.",
        "Which structure is the {desc}? Segment it.",
        "Show me the {desc}.",
        "Think about function: delineate the {desc}.",
        "Please outline the {desc}.",
        "Can you find the {desc}?",
        "Highlight the {desc}.",
        "Mark the {desc} in this image.",
        "Based on anatomical knowledge, isolate the {desc}.",
        "I need a mask of the {desc}.",
        "Where is the {desc}? Please segment it.",
        "Next, the {desc}.",
        "Locate the {desc}.",
        "Reason about its role and give me the {desc}.",
        "Give me the {desc}.",
        "Segment the {desc}, please.",
        "Could you delineate the {desc}?",
        "Find the {desc} and mask it.",
        "Work out which one is the {desc} and segment it.",
    ),
}

# Slot phrasings (not reserved: the held-out part is the sentence frame).
REL_PHRASES = {
    "left": ("to the patient's left of it", "on the patient's left side of it"),
    "right": ("to the patient's right of it", "on the patient's right side of it"),
    "anterior": ("in front of it", "anterior to it", "above it on the image"),
    "posterior": ("behind it", "posterior to it", "below it on the image"),
    "adjacent": ("next to it", "adjacent to it", "touching it"),
}
SAME_PHRASES = {
    "CT": ("with the same density as it", "of similar density to it", "of the same tissue type as it"),
    "MR": ("with the same signal intensity as it", "of similar signal to it", "of the same tissue type as it"),
}
KIND_PHRASES = ("of the same kind as it", "of the same type as it")
LARGER_PHRASES = ("that is larger than it", "that is bigger than it")
SMALLER_PHRASES = ("that is smaller than it", "that looks smaller than it")


def is_reserved(index: int) -> bool:
    """Reserved templates (every fifth) appear only in validation and test splits."""
    return index % 5 == 4


def allowed_indices(relation: str, use_reserved: bool) -> list[int]:
    """Template indices a split may use for `relation`."""
    n = len(TEMPLATES[relation])
    return [i for i in range(n) if use_reserved or not is_reserved(i)]


def render(relation: str, index: int, **slots: str) -> str:
    """The query of template `index` of `relation`, first letter upper case."""
    text = TEMPLATES[relation][index].format(**slots)
    return text[0].upper() + text[1:]


def template_regex(relation: str, index: int) -> re.Pattern:
    """A regex that matches exactly the queries rendered from one template (any slot values)."""
    parts = re.split(r"(\{[a-z]+\})", TEMPLATES[relation][index])
    body = "".join(".+?" if p.startswith("{") else re.escape(p) for p in parts)
    return re.compile(f"^{body}$", re.IGNORECASE)
