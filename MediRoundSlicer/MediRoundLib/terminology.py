"""Slicer terminology for an answer's entity: which standard structure or finding it names, as the
"TerminologyEntry" tag string Slicer stores on a segment, and the colour Slicer recommends for it.

Codes, meanings and colours are those of Slicer's own terminology lists (Slicer/Slicer,
Modules/Loadable/Terminologies/Resources/): SegmentationCategoryTypeModifier-SlicerGeneralAnatomy.json (loaded
by default; where a structure is listed there) or SegmentationCategoryTypeModifier-DICOM-Master.json, and
AnatomicRegionAndModifier-DICOM-Master.json for the organ a finding lies in. The tag string follows
vtkSlicerTerminologiesModuleLogic::SerializeTerminologyEntry:
    context~category~type~typeModifier~anatomicContext~region~regionModifier, each code as scheme^value^meaning.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

GENERAL_ANATOMY = "Segmentation category and type - 3D Slicer General Anatomy list"
DICOM_MASTER = "Segmentation category and type - DICOM master list"
ANATOMIC_CONTEXT = "Anatomic codes - DICOM master list"
ANATOMICAL_STRUCTURE = "SCT^123037004^Anatomical Structure"
TISSUE = "SCT^85756007^Tissue"
ALTERED = "SCT^49755003^Morphologically Altered Structure"
LEFT, RIGHT = "SCT^7771000^Left", "SCT^24028007^Right"
EMPTY = "^^"


@dataclass(frozen=True)
class Term:
    context: str
    category: str
    code: str  # SNOMED CT code value of the type
    meaning: str
    rgb: tuple | None = None  # recommendedDisplayRGBValue, when the list gives one
    lateral: bool = False  # the list offers Left/Right type modifiers
    region: bool = False  # also an anatomic region (AnatomicRegionAndModifier-DICOM-Master), for findings in it

    @property
    def type(self) -> str:
        return f"SCT^{self.code}^{self.meaning}"


def _a(code, meaning, rgb=None, lateral=False, region=True, context=GENERAL_ANATOMY, category=ANATOMICAL_STRUCTURE):
    return Term(context, category, code, meaning, rgb, lateral, region)


# entity words (regular expression) → term; longer phrases are tried first.
STRUCTURES = {
    r"adrenal(?: gland)?": _a("23451007", "Adrenal gland", (249, 186, 150), lateral=True),
    r"kidney": _a("64033007", "Kidney", (185, 102, 83), lateral=True),
    r"lung": _a("39607008", "Lung", (197, 165, 145), lateral=True),
    r"liver": _a("10200004", "Liver", (221, 130, 101)),
    r"spleen": _a("78961009", "Spleen", (157, 108, 162)),
    r"heart": _a("80891009", "Heart", (206, 110, 84)),
    r"aorta": _a("15825003", "Aorta", (224, 97, 76), region=False),
    r"pancreas": _a("15776009", "Pancreas", (249, 180, 111)),
    r"stomach": _a("69695003", "Stomach", (216, 132, 105)),
    r"gall ?bladder": _a("28231008", "Gallbladder", (139, 150, 98)),
    r"(?:urinary )?bladder": _a("89837001", "Bladder", (222, 154, 132)),
    r"brain": _a("12738006", "Brain", (250, 250, 225)),
    r"o?esophagus": _a("32849002", "Esophagus", (211, 171, 143), region=False),
    r"trachea": _a("44567001", "Trachea", (182, 228, 255), region=False),
    r"colon": _a("71854001", "Colon", (204, 168, 143)),
    r"duodenum": _a("38848004", "Duodenum", (255, 253, 229), region=False),
    r"small (?:intestine|bowel)": _a("30315005", "Small Intestine", (205, 167, 142), region=False),
    r"prostate": _a("41216001", "Prostate", (230, 158, 140)),
    r"thyroid(?: gland)?": _a("69748006", "Thyroid", (62, 162, 114)),
    r"uterus": _a("35039007", "Uterus", (255, 181, 158), region=False),
    r"spinal cord": _a("2748008", "Spinal cord", (244, 214, 49), region=False),
    r"sternum": _a("56873002", "Sternum", (244, 217, 154), region=False),
    r"ribs?": _a("113197003", "Rib", (253, 232, 158), region=False),
    r"bone": _a("272673000", "Bone", (241, 214, 145), region=False, category=TISSUE),
    r"vertebra[el]?": _a("51282000", "Vertebra", region=False, context=DICOM_MASTER),
    r"(?:inferior )?vena cava": _a("64131007", "Inferior vena cava", region=False, context=DICOM_MASTER),
    r"portal vein": _a("32764006", "Portal vein", lateral=True, region=False, context=DICOM_MASTER),
}
# Findings (category Morphologically Altered Structure). Slicer's lists have no "Lesion": a focal lesion is
# coded as the General Anatomy list's Mass, the way radiology reports use "mass lesion".
FINDINGS = {
    r"cysts?": Term(GENERAL_ANATOMY, ALTERED, "367643001", "Cyst", (205, 205, 100)),
    r"mass(?:es)?": Term(GENERAL_ANATOMY, ALTERED, "4147007", "Mass", (144, 238, 144)),
    r"lesions?": Term(GENERAL_ANATOMY, ALTERED, "4147007", "Mass", (144, 238, 144)),
    r"tumou?rs?|neoplasms?": Term(DICOM_MASTER, ALTERED, "108369006", "Neoplasm"),
    r"nodules?": Term(DICOM_MASTER, ALTERED, "27925004", "Nodule"),
}


def _find(table: dict, text: str):
    for pattern in sorted(table, key=len, reverse=True):
        m = re.search(rf"\b(?:{pattern})s?\b", text)
        if m:
            return table[pattern], m
    return None, None


def _side(text: str) -> str:
    left, right = re.search(r"\bleft\b", text), re.search(r"\bright\b", text)
    if left and not right:
        return LEFT
    if right and not left:
        return RIGHT
    return EMPTY


@dataclass(frozen=True)
class Match:
    term: Term
    entry: str  # the TerminologyEntry tag string


def lookup(entity: str | None) -> Match | None:
    """The standard term an entity names ("left kidney", "lesion in the left kidney", "ribs"), else None."""
    if not entity:
        return None
    text = entity.lower()
    finding, _ = _find(FINDINGS, text)
    structure, _ = _find(STRUCTURES, text)
    if finding is not None:
        region, modifier = EMPTY, EMPTY
        if structure is not None and structure.region:
            region = structure.type
            modifier = _side(text) if structure.lateral else EMPTY
        entry = "~".join([finding.context, finding.category, finding.type, EMPTY, ANATOMIC_CONTEXT, region, modifier])
        return Match(finding, entry)
    if structure is None:
        return None
    modifier = _side(text) if structure.lateral else EMPTY
    entry = "~".join([structure.context, structure.category, structure.type, modifier, ANATOMIC_CONTEXT, EMPTY,
                      EMPTY])
    return Match(structure, entry)


def terminology_entry(entity: str | None) -> str | None:
    found = lookup(entity)
    return found.entry if found else None


def standard_color(entity: str | None) -> tuple[float, float, float] | None:
    """Slicer's recommended display colour (0–1) for the entity's term, when its list gives one."""
    found = lookup(entity)
    if found is None or found.term.rgb is None:
        return None
    return tuple(v / 255.0 for v in found.term.rgb)
