"""The three generalisation sets of `mediround eval --sets` (issue 23), each its own QUALITY.md section:

- paraphrase: the held-out wordings (data/paraphrase_test.py) of generated dialogues against the templated
  wording of the same rounds (same images, masks, dataset references): Dice of each, entity accuracy.
- absent: generated dialogues with absent-target rounds inserted (data/absent.py, reserved templates and the
  grammar): the share of absent targets answered as absent, and of present targets answered as absent.
- real: the dialogues over the real labelled scans (data/real_validation.py): Dice per structure and source.
- variants: the demo dialogue on copies of the bundled volume with the same anatomy (evaluate/demo_variants.py:
  fields of view cropped around or into the body, non-square, re-oriented): Dice per round against the original
  (issue 26: within 0.05).

Every set runs the `ind+jcm` protocol (dataset references, JCM on; protocol.py). A section sits between
`<!-- name -->` and `<!-- /name -->` in QUALITY.md; a run replaces its own sections and keeps the rest.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .. import report_sections
from ..answers import says_absent, strip_seg
from .metrics import summarize
from .protocol import CONFIGS, evaluate_sample

SETS = ("paraphrase", "absent", "real", "variants")
CONFIG = CONFIGS["ind+jcm"]
TARGET_PARAPHRASE_GAP = 5.0  # Dice points below the templated wording, at most
TARGET_ENTITY = 90.0  # % entity accuracy on the paraphrase set
TARGET_ABSENT = 90.0  # % of absent targets answered as absent, at least
TARGET_FALSE_ABSENT = 5.0  # % of present targets answered as absent, at most
TARGET_SAME_ANSWER = 0.05  # per-round Dice of a demo variant within this of the original's


@dataclass
class SetResult:
    """One set's measurements and the report lines about them."""

    name: str
    rounds: int
    lines: list[str] = field(default_factory=list)
    verdicts: list[tuple[str, str, str]] = field(default_factory=list)  # (target, measured, PASS/MISS)


def _pct(values) -> float:
    values = list(values)
    return 100.0 * float(np.mean(values)) if values else float("nan")


def _f(x: float) -> str:
    return "n/a" if x != x else f"{x:.1f}"


def _verdict(ok: bool | None) -> str:
    return "n/a" if ok is None else "PASS" if ok else "MISS"


def _run(predictor, sample, dialogue_id: str, beta):
    (run,) = evaluate_sample(predictor, sample, [CONFIG], dialogue_id, beta=beta, keep_sessions=True)
    return run


# -- paraphrase ---------------------------------------------------------------------------------------------
def paraphrase_set(predictor, split: str, seed: int, n: int, beta=None, tick=lambda k: None) -> SetResult:
    from ..data.paraphrase_test import paraphrase_sample

    templated, heldout = [], []
    for i in range(n):
        sample = paraphrase_sample(split, seed, i)
        plain = copy.copy(sample)
        plain.queries = list(sample.meta["templated_queries"])
        templated += _run(predictor, plain, f"{split}-{i}", beta).records
        heldout += _run(predictor, sample, f"{split}-{i}", beta).records
        tick(2 * sample.num_rounds)
    a, b = summarize(r.counts for r in templated), summarize(r.counts for r in heldout)
    ent_t = _pct(r.entity_ok for r in templated if r.entity_ok is not None)
    ent_h = _pct(r.entity_ok for r in heldout if r.entity_ok is not None)
    gap = a.dice - b.dice
    res = SetResult("paraphrase", len(heldout))
    res.lines = [f"Generated split `{split}`, seed {seed}, dialogues 0–{n - 1}: every round asked twice, in the "
                 "templated wording and in the held-out wording (data/paraphrase_test.py), same images, masks and "
                 "dataset references.", "",
                 "| wording | rounds | Dice | gIoU | cIoU | entity acc. |", "|---|---|---|---|---|---|",
                 f"| templated | {a.n} | {_f(a.dice)} | {_f(a.giou)} | {_f(a.ciou)} | {_f(ent_t)} % |",
                 f"| held-out paraphrase | {b.n} | {_f(b.dice)} | {_f(b.giou)} | {_f(b.ciou)} | {_f(ent_h)} % |"]
    res.verdicts = [
        (f"paraphrase Dice within {TARGET_PARAPHRASE_GAP:.0f} of the templated wording",
         f"{_f(b.dice)} vs {_f(a.dice)} (gap {_f(gap)})", _verdict(None if gap != gap else gap <= TARGET_PARAPHRASE_GAP)),
        (f"paraphrase entity accuracy ≥ {TARGET_ENTITY:.0f} %", f"{_f(ent_h)} %",
         _verdict(None if ent_h != ent_h else ent_h >= TARGET_ENTITY))]
    return res


# -- absent targets -----------------------------------------------------------------------------------------
def absent_sample(split: str, seed: int, index: int, p: float = 0.5):
    """Dialogue `index` of `split` with absent-target rounds inserted (reserved templates or the grammar)."""
    from ..data.absent import with_absent_rounds
    from ..data.splits import make_dialogue, to_sample

    dlg = make_dialogue(split, seed, index)
    rng = np.random.default_rng([seed, index, 2323])
    return with_absent_rounds(to_sample(dlg), dlg.slice, rng, p=p, use_reserved=True)


def absent_set(predictor, split: str, seed: int, n: int, beta=None, tick=lambda k: None) -> SetResult:
    said_absent, said_absent_present, dice_present = [], [], []
    for i in range(n):
        sample = absent_sample(split, seed, i)
        run = _run(predictor, sample, f"{split}-{i}", beta)
        truth = sample.meta["absent"]
        for k, rnd in enumerate(run.session.rounds):
            flag = bool(getattr(rnd, "absent", False))
            if truth[k]:
                said_absent.append(flag)
            else:
                said_absent_present.append(flag)
                dice_present.append(run.records[k].counts)
        tick(sample.num_rounds)
    hit, false = _pct(said_absent), _pct(said_absent_present)
    present = summarize(dice_present)
    res = SetResult("absent", len(said_absent) + len(said_absent_present))
    res.lines = [f"Generated split `{split}`, seed {seed}, dialogues 0–{n - 1}, with a round asking for a structure "
                 "the slice does not show inserted after each round with probability 0.5 (data/absent.py; reserved "
                 "templates and the paraphrase grammar). Answered absent: the model's answer says the target is not "
                 "on this slice and draws no segment.", "",
                 "| rounds | n | answered absent | Dice |", "|---|---|---|---|",
                 f"| absent targets | {len(said_absent)} | {_f(hit)} % | – |",
                 f"| present targets | {len(said_absent_present)} | {_f(false)} % | {_f(present.dice)} |"]
    res.verdicts = [
        (f"absent targets answered as absent ≥ {TARGET_ABSENT:.0f} %", f"{_f(hit)} % (n={len(said_absent)})",
         _verdict(None if hit != hit else hit >= TARGET_ABSENT)),
        (f"present targets answered as absent ≤ {TARGET_FALSE_ABSENT:.0f} %",
         f"{_f(false)} % (n={len(said_absent_present)})", _verdict(None if false != false else false <= TARGET_FALSE_ABSENT))]
    return res


# -- real images --------------------------------------------------------------------------------------------
def structure_of(entity: str) -> str:
    for structure in ("lesion", "lung", "hemisphere"):
        if structure in entity:
            return structure
    return entity


def real_set(predictor, data_dir=None, beta=None, tick=lambda k: None) -> SetResult:
    from ..data.real_validation import default_data_dir, real_samples

    folder = Path(data_dir) if data_dir else default_data_dir()
    samples = real_samples(folder)
    rows = []  # (case, modality, source, entity, counts)
    answers = []  # what the model said in each row's round
    for sample in samples:
        run = _run(predictor, sample, sample.meta["case"], beta)
        for k, record in enumerate(run.records):
            rows.append((sample.meta["case"], sample.meta["modality"], sample.meta["label_sources"][k],
                         sample.entities[k], record.counts))
            answers.append(strip_seg(run.session.rounds[k].answer or ""))
        tick(sample.num_rounds)
    res = SetResult("real", len(rows))
    if not rows:
        res.lines = [f"No real labelled volumes found in `{folder}` (set MEDIROUND_REAL_DATA or --real-data)."]
        return res
    res.lines = [f"Real labelled scans (data/real_validation.py): the pyradiomics 3.1.0 test cases in `{folder}` "
                 "(one dialogue per case on its axial slice with the largest label: chest CT, the lung, then the "
                 "lesion in it; MR, the lesion) and, where fetched, the ICBM152 2009a T1 template from nilearn "
                 "0.14.1 (its slice with the most brain: the left, then the right hemisphere).", "",
                 "| case | modality | target asked | structure | label source | Dice | answer |",
                 "|---|---|---|---|---|---|---|"]
    for (case, modality, source, entity, counts), answer in zip(rows, answers):
        shown = answer if len(answer) <= 70 else answer[:69] + "…"
        res.lines.append(f"| {case} | {modality} | {entity} | {structure_of(entity)} | {source} | "
                         f"{_f(100 * counts.dice)} | {shown.replace('|', '/')} |")
    absent = sum(says_absent(a) for a in answers)
    res.lines += ["", f"Every target asked in these dialogues is on its slice: {absent} of {len(answers)} answered as "
                  "not on the slice."]
    res.lines += ["", "| group | rounds | Dice |", "|---|---|---|"]
    groups: dict[str, list] = {}
    for case, modality, source, entity, counts in rows:
        groups.setdefault(f"structure: {structure_of(entity)}", []).append(counts)
        kind = "chest CT" if modality == "CT" else "brain template MR" if case == "mni152" else "brain/breast MR"
        groups.setdefault(f"source: {modality} ({kind})", []).append(counts)
    groups = dict(sorted(groups.items()))
    groups["all"] = [r[-1] for r in rows]
    for name, counts in groups.items():
        s = summarize(counts)
        res.lines.append(f"| {name} | {s.n} | {_f(s.dice)} |")
    extent, extent_rounds = lung_extent_lines(predictor, folder, beta, tick)
    res.lines += extent
    res.rounds += extent_rounds
    return res


def lung_extent_lines(predictor, folder: Path, beta=None, tick=lambda k: None) -> tuple[list[str], int]:
    """The table of each chest CT's lungs asked over its extent (`real_validation.lung_extent_samples`), and how
    many rounds it took."""
    from ..data.real_validation import CASES, EXTENT_SLICES, lung_extent_samples

    rows, rounds = [], 0
    for case in (c for c, modality in CASES.items() if modality == "CT"):
        if not (folder / f"{case}_image.nrrd").is_file():
            continue
        counts, absent, slices = [], 0, 0
        for sample in lung_extent_samples(case, folder):
            run = _run(predictor, sample, f"{case}-extent-{sample.meta['slice']}", beta)
            counts += [record.counts for record in run.records]
            absent += sum(says_absent(strip_seg(r.answer or "")) for r in run.session.rounds)
            slices += 1
            tick(sample.num_rounds)
        if not counts:  # no slice shows both lungs
            continue
        rounds += len(counts)
        lowest = min(100 * c.dice for c in counts)
        rows.append(f"| {case} | {slices} | {len(counts)} | {_f(summarize(counts).dice)} | {_f(lowest)} | {absent} |")
    if not rows:
        return [], 0
    return ["", f"Each chest CT's lungs over its extent: on {EXTENT_SLICES} axial slices spread evenly over those "
            "showing both lungs, \"Segment the left lung.\" then \"Segment the right lung.\" (HU threshold labels; "
            "one slice judges a model change poorly).", "",
            "| case | slices | rounds | Dice | lowest round | answered absent |", "|---|---|---|---|---|---|", *rows], rounds


# -- variants -----------------------------------------------------------------------------------------------
def variants_set(predictor, beta=None, tick=lambda k: None, names=None) -> SetResult:
    """The demo dialogue on every variant of the demo volume (`names`: some of them; the original always)."""
    from ..imaging import extract_slice
    from .demo_variants import DEMO_VARIANTS, KINDS, demo_variant, run_demo_dialogue

    scores, shapes = {}, {}
    for name in ["original"] + [n for n in (names or DEMO_VARIANTS) if n != "original"]:
        scores[name] = run_demo_dialogue(predictor, name, beta=beta)
        volume, _, index, _ = demo_variant(name)
        shapes[name] = "×".join(map(str, extract_slice(volume, "axial", index).pixels.shape))
        tick(len(scores[name]))
    original = scores["original"]
    res = SetResult("variants", sum(map(len, scores.values())))
    rounds = len(original)
    res.lines = ["The bundled demo dialogue (left kidney, the lesion in it, gallbladder, spleen; each round's reference "
                 "as the script gives it) on copies of the demo volume made with SimpleITK's own filters, same "
                 "anatomy, every target whole (evaluate/demo_variants.py); Dice of each round's mask on the displayed "
                 "slice against the labels carried through the same change.", "",
                 "| variant | kind | slice (rows×cols) | " + " | ".join(f"R{k + 1}" for k in range(rounds))
                 + " | largest difference |", "|---|---|---|" + "---|" * (rounds + 1)]
    failing = []
    for name, dice in scores.items():
        # same anatomy, same answer: a round better on the copy than on the original differs as much as a worse one
        diff = max(abs(o - d) for o, d in zip(original, dice))
        if diff > TARGET_SAME_ANSWER:
            failing.append(name)
        res.lines.append(f"| {name} | {KINDS[name]} | {shapes[name]} | " + " | ".join(f"{d:.3f}" for d in dice)
                         + f" | {diff:.3f} |")
    for kind in dict.fromkeys(KINDS.values()):
        if kind == "the bundled volume":
            continue
        members = [n for n in scores if KINDS[n] == kind]
        if not members:
            continue
        bad = [n for n in members if n in failing]
        res.verdicts.append((f"{kind}: every round within {TARGET_SAME_ANSWER} of the original",
                             f"{len(members) - len(bad)} of {len(members)} variants" + (f" (not: {', '.join(bad)})"
                                                                                    if bad else ""),
                             _verdict(not bad)))
    return res


# -- QUALITY.md sections ------------------------------------------------------------------------------------
TITLES = {"paraphrase": "Held-out paraphrase set", "absent": "Absent targets",
          "real": "Real-image validation", "variants": "Same anatomy, other field of view or orientation"}


def section_text(result: SetResult, header: str) -> str:
    lines = [f"## {TITLES[result.name]}", "", header, ""] + result.lines + [""]
    if result.verdicts:
        lines += ["| target | measured | result |", "|---|---|---|"]
        lines += [f"| {t} | {m} | **{v}** |" for t, m, v in result.verdicts]
    return "\n".join(lines)


def write_section(path: Path, name: str, body: str) -> Path:
    """Replace (or append) the `<!-- name -->` … `<!-- /name -->` block of QUALITY.md, atomically."""
    return report_sections.write_section(path, name, body, new_file="# MediRound quality\n")


def kept_sections(old_text: str) -> str:
    """The set sections of an existing QUALITY.md, to append when the main evaluation rewrites the file."""
    blocks = [m.group(0) for name in SETS if (m := report_sections.section_pattern(name).search(old_text or ""))]
    return "".join("\n" + b for b in blocks)
