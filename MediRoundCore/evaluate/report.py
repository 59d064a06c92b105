"""QUALITY.md, the summary CSV and the per-round plot, from the round records of an evaluation run."""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .metrics import Scores, per_round, summarize
from .protocol import BASELINE, CONFIGS, RoundRecord

LATE_ROUND = 4  # "rounds ≥ 4" for the JCM target
TARGET_DICE = 85.0
TARGET_JCM_GAIN = 1.0
TARGET_NOREF_DROP = 15.0


@dataclass
class RunInfo:
    """What the report says about the run (everything but the scores)."""

    command: str
    date: str
    model: str
    device: str
    cpu: str
    threads: int
    versions: str
    code: str
    data: str
    split_sizes: dict
    wall_seconds: float
    notes: list[str] = field(default_factory=list)


def _fmt(x: float, digits: int = 1) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"


def _signed(x: float) -> str:
    return "n/a" if x is None or math.isnan(x) else f"{x:+.1f}"


def group(records, config: str, where=lambda r: True) -> Scores:
    return summarize(r.counts for r in records if r.config == config and where(r))


def split_sizes(samples) -> dict:
    """Dialogue and round counts of the evaluated samples."""
    from .protocol import is_ambiguous

    n_rounds = [s.num_rounds for s in samples]
    per = {}
    for n in n_rounds:
        for k in range(1, n + 1):
            per[k] = per.get(k, 0) + 1
    amb = [is_ambiguous(s, k) for s in samples for k in range(s.num_rounds)]
    return {
        "dialogues": len(samples),
        "rounds": int(sum(n_rounds)),
        "rounds_min": min(n_rounds) if n_rounds else 0,
        "rounds_max": max(n_rounds) if n_rounds else 0,
        "rounds_mean": float(np.mean(n_rounds)) if n_rounds else 0.0,
        "per_round": per,
        "with_reference": sum(r is not None for s in samples for r in s.ref_indices),
        "ambiguous": sum(a is True for a in amb),
        "ambiguity_known": sum(a is not None for a in amb),
    }


def summary_rows(records: list[RoundRecord], configs: list[str]) -> list[dict]:
    """Long-format rows: config, scope (overall / round / late / ambiguous), round, n, dice, giou, ciou."""
    rows = []
    for c in configs:
        mine = [r for r in records if r.config == c]
        scopes = [("overall", "", summarize(r.counts for r in mine)),
                  (f"rounds>={LATE_ROUND}", "", summarize(r.counts for r in mine if r.round >= LATE_ROUND)),
                  ("ambiguous", "", summarize(r.counts for r in mine if r.ambiguous))]
        scopes += [("round", k, s) for k, s in per_round(mine).items()]
        for scope, k, s in scopes:
            rows.append({"config": c, "scope": scope, "round": k, "n": s.n, "dice": round(s.dice, 3),
                         "giou": round(s.giou, 3), "ciou": round(s.ciou, 3)})
    return rows


def write_csv(records, configs, path: Path) -> Path:
    rows = summary_rows(records, configs)
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]) if rows else ["config"])
        w.writeheader()
        w.writerows(rows)
    return path


RECORD_FIELDS = ["config", "dialogue", "round", "dice", "iou", "intersection", "union", "pred_area", "gt_area",
                 "gt_reference", "reference", "ambiguous", "relation", "entity_ok", "jcm_score", "corrected",
                 "seg_forced", "seconds", "entity", "reference_tries"]


def write_records_csv(records, path: Path) -> Path:
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(RECORD_FIELDS)
        for r in records:
            c = r.counts
            w.writerow([r.config, r.dialogue, r.round, f"{c.dice:.5f}", f"{c.iou:.5f}", c.intersection, c.union,
                        c.pred_area, c.gt_area, r.gt_reference, r.reference, r.ambiguous, r.relation, r.entity_ok,
                        "" if r.jcm_score is None else f"{r.jcm_score:.4f}", r.corrected, r.seg_forced,
                        f"{r.seconds:.4f}", r.entity or "", r.reference_tries])
    return path


def write_plot(records, configs, path: Path, title: str = "") -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.4))
    counts: dict[int, int] = {}
    for c in configs:
        per = per_round([r for r in records if r.config == c])
        if not per:
            continue
        counts = counts or {k: s.n for k, s in per.items()}
        ks = list(per)
        style = "-" if c == BASELINE else "--" if not CONFIGS[c].jcm else ":"
        width = 2.2 if c == BASELINE else 1.3
        for ax, metric in zip(axes, ("dice", "ciou")):
            ax.plot(ks, [getattr(per[k], metric) for k in ks], style, marker="o", ms=3, lw=width, label=c)
    for ax, name in zip(axes, ("Dice (%)", "cIoU (%)")):
        ax.set_xlabel("round (masks)")
        ax.set_ylabel(name)
        ax.set_ylim(0, 100)
        ax.grid(alpha=0.3)
        ax.set_xticks(list(counts), [f"{k}\n({n})" for k, n in counts.items()], fontsize=8)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, fontsize=8, loc="center right")
    fig.suptitle(title or "MediRound multi-round evaluation: per-round scores", fontsize=10)
    fig.tight_layout(rect=(0, 0, 0.88, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def bootstrap_ci(records, a: str, b: str | None = None, where=lambda r: True, n_boot: int = 2000,
                 seed: int = 0) -> tuple[float, float]:
    """95 % interval (percent) of config a's mean Dice, or of a − b on the rounds both scored, resampling
    whole dialogues (rounds of one dialogue are not independent). NaN when nothing matches."""
    da = {(r.dialogue, r.round): r.counts.dice for r in records if r.config == a and where(r)}
    db = {(r.dialogue, r.round): r.counts.dice for r in records if r.config == b and where(r)} if b else {}
    keys = [k for k in da if b is None or k in db]
    if not keys:
        return math.nan, math.nan
    dialogues = sorted({k[0] for k in keys})
    index = {d: i for i, d in enumerate(dialogues)}
    sums, counts = np.zeros(len(dialogues)), np.zeros(len(dialogues))
    for k in keys:
        sums[index[k[0]]] += da[k] - (db[k] if b else 0.0)
        counts[index[k[0]]] += 1
    rng = np.random.default_rng(seed)
    picks = rng.integers(0, len(dialogues), size=(n_boot, len(dialogues)))
    means = 100 * sums[picks].sum(1) / counts[picks].sum(1)
    return float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))


def _ci(interval) -> str:
    lo, hi = interval
    return "" if math.isnan(lo) else f", 95 % CI {lo:+.1f}…{hi:+.1f}"


def _paired_target(records, have, title, base, other, where, target, as_drop=False) -> tuple[str, str, str]:
    """A target on the Dice difference `base − other` over the rounds selected by `where`; `as_drop` shows it
    as `other − base` (a loss)."""
    if not {base, other} <= have:
        return title, f"needs {base} and {other}", "n/a"
    a, b = group(records, base, where), group(records, other, where)
    diff = a.dice - b.dice
    verdict = "n/a" if math.isnan(diff) else "PASS" if diff >= target else "FAIL"
    ci = bootstrap_ci(records, other, base, where) if as_drop else bootstrap_ci(records, base, other, where)
    shown = -diff if as_drop else diff
    return title, f"{_fmt(a.dice)} vs {_fmt(b.dice)} ({_signed(shown)}{_ci(ci)}, n={a.n})", verdict


def targets(records, configs) -> list[tuple[str, str, str]]:
    """(target, measured, PASS / FAIL / n/a) for the project's quality targets."""
    have = set(configs)
    out = []
    if BASELINE in have:
        s = group(records, BASELINE)
        ok = s.dice >= TARGET_DICE
        lo, hi = bootstrap_ci(records, BASELINE)
        out.append((f"overall Dice ≥ {TARGET_DICE:.0f} with dataset references ({BASELINE})",
                    f"{_fmt(s.dice)} (95 % CI {_fmt(lo)}–{_fmt(hi)}, n={s.n})", "PASS" if ok else "FAIL"))
    else:
        out.append((f"overall Dice ≥ {TARGET_DICE:.0f} with dataset references", f"{BASELINE} not run", "n/a"))
    out.append(_paired_target(records, have, f"JCM ≥ {TARGET_JCM_GAIN:.0f} Dice better than without on rounds ≥ "
                              f"{LATE_ROUND}", BASELINE, "ind-nojcm", lambda r: r.round >= LATE_ROUND,
                              TARGET_JCM_GAIN))
    out.append(_paired_target(records, have, f"no-reference ablation ≥ {TARGET_NOREF_DROP:.0f} Dice worse on "
                              "ambiguous rounds", BASELINE, "noref", lambda r: r.ambiguous is True,
                              TARGET_NOREF_DROP, as_drop=True))
    return out


SIZE_BINS = (1, 64, 256, 1024)  # ground-truth areas in pixels: empty, <64, 64–255, 256–1023, ≥1024
SCORE_BINS = (0.5, 0.7, 0.9)  # JCM quality scores: <0.5, 0.5–0.7, 0.7–0.9, ≥0.9


def _bin_labels(edges, unit: str = "") -> list[str]:
    labels = [f"< {edges[0]}{unit}"]
    labels += [f"{lo}–{hi}{unit}" for lo, hi in zip(edges, edges[1:])]
    return labels + [f"≥ {edges[-1]}{unit}"]


def size_table(records, configs) -> list[str]:
    """Dice by the ground truth's area: small targets are where a coarse mask decoder loses most."""
    labels = ["empty"] + _bin_labels(SIZE_BINS[1:], " px")
    which = lambda r: int(np.searchsorted(SIZE_BINS, r.counts.gt_area, side="right"))  # noqa: E731
    L = ["## Dice per target size (ground-truth pixels)", "",
         "| config | " + " | ".join(f"{b} (n)" for b in labels) + " |", "|---|" + "---|" * len(labels)]
    for c in configs:
        cells = []
        for i in range(len(labels)):
            s = group(records, c, lambda r, i=i: which(r) == i)
            cells.append(f"{_fmt(s.dice)} ({s.n})" if s.n else "–")
        L.append(f"| {c} | " + " | ".join(cells) + " |")
    return L + [""]


def jcm_judgment_table(records, configs) -> list[str]:
    """How well the JCM quality score ranks the masks it judges (configs with JCM on)."""
    judged = [c for c in configs if any(r.config == c and r.jcm_score is not None for r in records)]
    if not judged:
        return []
    labels = _bin_labels(SCORE_BINS)
    L = ["## JCM judgment: Dice by quality score", "",
         "| config | corr(score, Dice) | " + " | ".join(f"score {b} (n)" for b in labels) + " | corrected |",
         "|---|---|" + "---|" * len(labels) + "---|"]
    for c in judged:
        mine = [r for r in records if r.config == c and r.jcm_score is not None]
        scores = np.array([r.jcm_score for r in mine])
        dice = np.array([r.dice for r in mine])
        varied = len(mine) > 1 and scores.std() > 0 and dice.std() > 0
        corr = float(np.corrcoef(scores, dice)[0, 1]) if varied else float("nan")
        bins = np.searchsorted(SCORE_BINS, scores, side="right")
        cells = [f"{_fmt(100 * dice[bins == i].mean())} ({int((bins == i).sum())})" if (bins == i).any() else "–"
                 for i in range(len(labels))]
        corrected = _fmt(100 * np.mean([r.corrected for r in mine]))
        L.append(f"| {c} | {_fmt(corr, 2)} | " + " | ".join(cells) + f" | {corrected} % |")
    return L + ["", "A useful judgment puts low-Dice masks at low scores (high correlation); the correction can only "
                "help the masks scored at or below β.", ""]


def markdown(records: list[RoundRecord], configs: list[str], info: RunInfo, files: dict[str, str]) -> str:
    sizes = info.split_sizes
    max_round = max((r.round for r in records), default=0)
    late = lambda r: r.round >= LATE_ROUND  # noqa: E731
    amb = lambda r: r.ambiguous is True  # noqa: E731
    L = ["# MediRound quality (multi-round evaluation)", "",
         "Written by `mediround eval` (MediRoundCore/evaluate); do not edit by hand. Protocol: each round's predicted "
         "mask (never the ground truth) feeds the rounds that refer to it; one Session per dialogue and config. "
         "Dice = mean per-mask Dice, gIoU = mean per-mask IoU, cIoU = Σ intersection / Σ union, in percent "
         "(an empty prediction of an empty ground truth scores 1).", "",
         "## Run", "",
         "| | |", "|---|---|",
         f"| command | `{info.command}` |",
         f"| date (UTC) | {info.date} |",
         f"| code | {info.code} |",
         f"| model | {info.model} |",
         f"| device | {info.device} |",
         f"| machine | CPU {info.cpu}; torch threads {info.threads} |",
         f"| software | {info.versions} |",
         f"| wall time | {info.wall_seconds / 60:.1f} min |", ""]
    L += ["## Data", "",
          "| | |", "|---|---|",
          f"| source | {info.data} |",
          f"| dialogues | {sizes['dialogues']} |",
          f"| rounds | {sizes['rounds']} ({sizes['rounds_min']}–{sizes['rounds_max']} per dialogue, "
          f"mean {sizes['rounds_mean']:.1f}) |",
          f"| rounds with a dataset reference | {sizes['with_reference']} |",
          f"| rounds ambiguous without their reference | {sizes['ambiguous']}"
          + ("" if sizes['ambiguity_known'] == sizes['rounds'] else
             f" (known for {sizes['ambiguity_known']} of {sizes['rounds']} rounds)") + " |",
          "", "Masks per round: " + ", ".join(f"#{k}: {n}" for k, n in sorted(sizes["per_round"].items())), ""]
    L += ["## Configurations", "", "| config | what |", "|---|---|"]
    L += [f"| {c} | {CONFIGS[c].description} |" for c in configs]
    L += [""]
    L += ["## Overall", "",
          f"| config | masks | Dice | gIoU | cIoU | Dice rounds ≥ {LATE_ROUND} | Dice ambiguous | entity acc. | "
          "JCM corrected | reference = dataset's | [SEG] forced | s / round |",
          "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for c in configs:
        mine = [r for r in records if r.config == c]
        s = summarize(r.counts for r in mine)
        ents = [r.entity_ok for r in mine if r.entity_ok is not None]
        refs = [r for r in mine if r.round > 1 and r.gt_reference is not None]
        corr = [r.corrected for r in mine if r.jcm_score is not None]
        L.append(f"| {c} | {s.n} | {_fmt(s.dice)} | {_fmt(s.giou)} | {_fmt(s.ciou)} | "
                 f"{_fmt(group(records, c, late).dice)} | {_fmt(group(records, c, amb).dice)} | "
                 f"{_fmt(100 * np.mean(ents)) if ents else 'n/a'} | "
                 f"{_fmt(100 * np.mean(corr)) + ' %' if corr else 'off'} | "
                 f"{_fmt(100 * np.mean([r.reference == r.gt_reference for r in refs])) + ' %' if refs else 'n/a'} | "
                 f"{_fmt(100 * np.mean([r.seg_forced for r in mine]))} % | "
                 f"{np.mean([r.seconds for r in mine]):.3f} |" if mine else f"| {c} | 0 |" + " |" * 10)
    L += ["", "Entity acc.: the answer names the target entity exactly. Reference = dataset's: share of rounds ≥ 2 "
          "whose reference (given or resolved) is the dataset's. [SEG] forced: answers that ended without `[SEG]` "
          "and were closed with one. s / round: the first config of each dialogue "
          "also encodes the slice.", ""]
    for metric, name in (("dice", "Dice"), ("ciou", "cIoU")):
        L += [f"## Per-round {name}", "",
              "| config | " + " | ".join(f"#{k}" for k in range(1, max_round + 1)) + " |",
              "|---|" + "---|" * max_round]
        for c in configs:
            per = per_round([r for r in records if r.config == c])
            L.append(f"| {c} | " + " | ".join(_fmt(getattr(per[k], metric)) if k in per else "" for k in
                                               range(1, max_round + 1)) + " |")
        L.append("")
    relations = sorted({r.relation for r in records if r.relation})
    if relations:
        L += ["## Dice per relation of the round to its reference", "",
              "| config | " + " | ".join(f"{rel} (n)" for rel in relations) + " |", "|---|" + "---|" * len(relations)]
        for c in configs:
            cells = []
            for rel in relations:
                s = group(records, c, lambda r, rel=rel: r.relation == rel)
                cells.append(f"{_fmt(s.dice)} ({s.n})")
            L.append(f"| {c} | " + " | ".join(cells) + " |")
        L.append("")
    L += size_table(records, configs)
    L += jcm_judgment_table(records, configs)
    others = [c for c in configs if c != BASELINE]
    if BASELINE in configs and others:
        base_all, base_late = group(records, BASELINE), group(records, BASELINE, late)
        base_amb = group(records, BASELINE, amb)
        L += [f"## Ablations and variants: difference to {BASELINE}", "",
              f"| config | Δ Dice | Δ gIoU | Δ cIoU | Δ Dice rounds ≥ {LATE_ROUND} | Δ Dice ambiguous |",
              "|---|---|---|---|---|---|"]
        for c in others:
            s, sl, sa = group(records, c), group(records, c, late), group(records, c, amb)
            L.append(f"| {c} | {_signed(s.dice - base_all.dice)} | {_signed(s.giou - base_all.giou)} | "
                     f"{_signed(s.ciou - base_all.ciou)} | {_signed(sl.dice - base_late.dice)} | "
                     f"{_signed(sa.dice - base_amb.dice)} |")
        L.append("")
    L += ["## Targets", "", "| target | measured | result |", "|---|---|---|"]
    L += [f"| {t} | {m} | **{v}** |" for t, m, v in targets(records, configs)]
    L += ["", "PASS/FAIL compares the point estimate with the target; the intervals resample whole dialogues "
          "(differences paired round by round).", ""]
    if info.notes:
        L += ["## Notes", ""] + [f"- {n}" for n in info.notes] + [""]
    L += ["## Files", ""] + [f"- {k}: `{v}`" for k, v in files.items()] + [""]
    if "plot" in files:
        L += [f"![per-round scores]({Path(files['plot']).name})", ""]
    return "\n".join(L)
