"""Mutation check of the code that decides where masks land and what the model sees (issue 26).

Each mutant is one realistic one-line bug in a core module (slice extraction and display orientation, masks back
into the volume, the volume fingerprint, the CT window, the model's square frame and box, mask unpadding, the
slice-range check, reference resolution, the Slicer plane finder, the language model's one-token decoding step,
a slice's place in the model's field). Mutants are applied one at a time to a copy of
the working tree (this checkout is never changed); the guard tests run against each with `-x`, and a mutant is
*killed* when a test fails. The report names each mutant, its kind, and the first test that failed (or SURVIVED).

    nice -n 10 python benchmarks/mutation.py [--out benchmarks/MUTATION.md] [--only ID ...] [--tests FILE ...]

Slow (a minute or two per surviving mutant on two cores): it runs outside CI. The report is written only by this
script.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# The guard tests, fastest first (a killed mutant stops at its first failing test).
GUARD_TESTS = [
    "tests/test_geometry_properties.py",
    "tests/test_model_frame.py",
    "tests/test_physical_frame.py",
    "tests/test_field_placement.py",
    "tests/test_session.py",
    "tests/test_reference_scorer.py",
    "tests/test_model.py",
    "tests/test_decode_step.py",
    "tests/test_shipped_model.py",
    "tests/test_slicer_logic_shipped.py",
    "tests/test_slicer_geometry.py",
    "tests/test_properties.py",
    "tests/test_cli.py",
    "tests/test_engine.py",
    "tests/test_slicer_logic.py",
]


@dataclass(frozen=True)
class Mutant:
    id: str
    kind: str
    path: str
    old: str
    new: str
    what: str
    from_issue: bool = False


IMAGING, PROCESSING, REFERENCES = "MediRoundCore/imaging.py", "MediRoundCore/model/processing.py", \
    "MediRoundCore/references.py"
GEOMETRY = "MediRoundSlicer/MediRoundLib/geometry.py"
DECODE_STEP = "MediRoundCore/model/decode_step.py"
PLACEMENT = "MediRoundCore/model/field_placement.py"

MUTANTS = [
    # -- the bugs of issue 26 ---------------------------------------------------------------------------------
    Mutant("axial-left-right", "display convention", IMAGING,
           '_VIEW_COLUMNS = {"axial": (0, +1)', '_VIEW_COLUMNS = {"axial": (0, -1)',
           "left/right flipped for axial slices (patient left on image left)", True),
    Mutant("unpad-hw-swapped", "padding", PROCESSING,
           "x = x[..., top:top + input_hw[0], left:left + input_hw[1]]",
           "x = x[..., left:left + input_hw[1], top:top + input_hw[0]]",
           "height and width swapped when removing the segmenter's padding", True),
    Mutant("to-plane-order", "mask back", IMAGING,
           "        m = mask\n        if self.flip_cols:\n            m = m[:, ::-1]\n        if self.flip_rows:\n"
           "            m = m[::-1, :]\n        if self.transpose:\n            m = m.T",
           "        m = mask\n        if self.transpose:\n            m = m.T\n        if self.flip_cols:\n"
           "            m = m[:, ::-1]\n        if self.flip_rows:\n            m = m[::-1, :]",
           "transpose and flips in reverse order when a mask goes back to a permuted volume", True),
    Mutant("ct-window-double", "intensity", IMAGING,
           "lo, hi = level - width / 2, level + width / 2", "lo, hi = level - width, level + width",
           "the CT window computed twice as wide", True),
    Mutant("fingerprint-voxels-only", "fingerprint", IMAGING,
           "        h.update(np.round(np.r_[self.spacing, self.origin, self.direction.ravel()], 4)"
           ".astype(np.float64).tobytes())\n", "",
           "the volume fingerprint ignores spacing, origin and direction", True),
    Mutant("slice-range-off-by-one", "range check", IMAGING,
           "if not 0 <= index < n:", "if not 0 <= index <= n:",
           "the slice-range check lets index n through (IndexError instead of the message)", True),
    Mutant("explicit-loses-to-named", "reference precedence", REFERENCES,
           "    if explicit is not None:\n        return validate_reference(explicit, len(entities))\n"
           "    if not entities:\n        return None\n",
           "    if entities and named_round(query, entities):\n        return named_round(query, entities)\n"
           "    if explicit is not None:\n        return validate_reference(explicit, len(entities))\n"
           "    if not entities:\n        return None\n",
           "a round the query names wins over the round the user picked", True),
    Mutant("entity-tie-first-round", "reference precedence", REFERENCES,
           "(best is None or len(name) >= best[0])", "(best is None or len(name) > best[0])",
           "ties between rounds of the same entity go to the earliest round", True),
    Mutant("non-square-corner-padding", "padding", PROCESSING,
           "    return (size - int(input_hw[0])) // 2, (size - int(input_hw[1])) // 2",
           "    return 0, 0",
           "the slice anchored top-left in the model frame (the non-square collapse of issue 26)", True),
    # -- more of the same kinds -------------------------------------------------------------------------------
    Mutant("axial-anterior-down", "display convention", IMAGING,
           '_VIEW_ROWS = {"axial": (1, +1)', '_VIEW_ROWS = {"axial": (1, -1)', "axial slices shown anterior down"),
    Mutant("coronal-superior-down", "display convention", IMAGING,
           '"coronal": (2, -1), "sagittal": (2, -1)}', '"coronal": (2, +1), "sagittal": (2, -1)}',
           "coronal slices shown upside down"),
    Mutant("sagittal-columns-flipped", "display convention", IMAGING,
           '"sagittal": (1, +1)}', '"sagittal": (1, -1)}', "sagittal slices mirrored (anterior on image right)"),
    Mutant("view-axis-direction-transposed", "slice choice", IMAGING,
           "np.argmax(np.abs(self.direction[_VIEW_NORMAL[view], :]))",
           "np.argmax(np.abs(self.direction[:, _VIEW_NORMAL[view]]))",
           "the slice axis read from the direction's columns instead of its rows"),
    Mutant("transpose-test-inverted", "display convention", IMAGING,
           "transpose = abs(d[col_patient, row_axis]) > abs(d[col_patient, col_axis])",
           "transpose = abs(d[col_patient, row_axis]) < abs(d[col_patient, col_axis])",
           "in-plane axes swapped (display transposed) on every volume"),
    Mutant("flip-rows-sign", "display convention", IMAGING,
           "flip_rows = np.sign(d[row_patient, row_axis]) != row_sign",
           "flip_rows = np.sign(d[row_patient, col_axis]) != row_sign",
           "row flip decided from the column axis"),
    Mutant("mask-into-wrong-axis", "mask back", IMAGING,
           "    idx[2 - slice_image.axis] = slice_image.index", "    idx[slice_image.axis] = slice_image.index",
           "a mask written into the plane of the wrong array axis"),
    Mutant("to-plane-no-transpose", "mask back", IMAGING,
           "        if self.transpose:\n            m = m.T\n        return np.ascontiguousarray(m)",
           "        return np.ascontiguousarray(m)", "a mask goes back without undoing the transpose"),
    Mutant("fingerprint-no-direction", "fingerprint", IMAGING,
           "np.r_[self.spacing, self.origin, self.direction.ravel()]", "np.r_[self.spacing, self.origin]",
           "the fingerprint ignores the direction only"),
    Mutant("ct-window-level-shift", "intensity", IMAGING,
           "lo, hi = level - width / 2, level + width / 2", "lo, hi = level - width / 4, level + 3 * width / 4",
           "the CT window centred 100 HU too high"),
    Mutant("padding-grey", "padding", PROCESSING,
           "    img = torch.as_tensor(np.ascontiguousarray(slice01), dtype=torch.float32)[None]\n"
           "    img, input_hw = _into_frame(img, config.segmenter.image_size, extent)\n    img = img.expand(3, -1, -1)\n"
           "    if config.segmenter_normalization == \"sam_mean_std\":\n"
           "        img = (img * 255.0 - torch.tensor(SAM_MEAN)[:, None, None]) / torch.tensor(SAM_STD)[:, None, None]\n"
           "    return img, input_hw",
           "    img = torch.as_tensor(np.ascontiguousarray(slice01), dtype=torch.float32)[None].expand(3, -1, -1)\n"
           "    if config.segmenter_normalization == \"sam_mean_std\":\n"
           "        img = (img * 255.0 - torch.tensor(SAM_MEAN)[:, None, None]) / torch.tensor(SAM_STD)[:, None, None]\n"
           "    return _into_frame(img, config.segmenter.image_size, extent)",
           "the segmenter's padding added after normalisation (a grey band)"),
    Mutant("vision-padding-grey", "padding", PROCESSING,
           "    img = _into_frame(img, config.vision.image_size, extent)[0].expand(3, -1, -1)\n"
           "    return (img - torch.tensor(CLIP_MEAN)[:, None, None]) / torch.tensor(CLIP_STD)[:, None, None]",
           "    img = (img.expand(3, -1, -1) - torch.tensor(CLIP_MEAN)[:, None, None]) / torch.tensor(CLIP_STD)[:, None, None]\n"
           "    return _into_frame(img, config.vision.image_size, extent)[0]",
           "the vision tower's padding added after normalisation (a grey band)"),
    Mutant("mr-percentiles", "intensity", IMAGING,
           "lo, hi = np.percentile(x, [0.5, 99.5])", "lo, hi = np.percentile(x, [2.0, 98.0])",
           "MR scaled by other percentiles than the training renderer's"),
    Mutant("reference-crop-unmasked", "reference", PROCESSING,
           "crop = (slice01 * (mask > 0))[y0:y1, x0:x1].astype(np.float32)",
           "crop = slice01[y0:y1, x0:x1].astype(np.float32)",
           "the reference crop not masked by the referenced round's mask"),
    Mutant("box-by-slice-size", "box", PROCESSING,
           "    return [ox + x0 / w * fc, oy + y0 / h * fr, ox + x1 / w * fc, oy + y1 / h * fr]",
           "    return [x0 / w, y0 / h, x1 / w, y1 / h]", "the reference box normalised by the slice, not the frame"),
    Mutant("box-xy-swapped", "box", PROCESSING,
           "    oy, ox = (1.0 - fr) / 2, (1.0 - fc) / 2", "    oy, ox = (1.0 - fc) / 2, (1.0 - fr) / 2",
           "the box's offsets for height and width swapped"),
    Mutant("targets-pad-swapped", "padding", PROCESSING,
           "    t = F.pad(t, (left, size - input_hw[1] - left, top, size - input_hw[0] - top))",
           "    t = F.pad(t, (top, size - input_hw[0] - top, left, size - input_hw[1] - left))",
           "training targets padded with height and width swapped"),
    Mutant("resize-out-hw-swapped", "padding", PROCESSING,
           "return F.interpolate(x, size=out_hw, mode=\"bilinear\", align_corners=False)[:, 0]",
           "return F.interpolate(x, size=(out_hw[1], out_hw[0]), mode=\"bilinear\", align_corners=False)[:, 0]",
           "the mask resized to the slice with height and width swapped"),
    # -- the physical frame (a scan cut into the body keeps its scale) ----------------------------------------
    Mutant("frame-always-fills", "physical frame", PROCESSING,
           "    k = 1.0 / max(er, ec) if extent is None or max(er, ec) > 1.0 else 1.0",
           "    k = 1.0 / max(er, ec)", "a slice inside the model's field of view magnified to fill the frame"),
    Mutant("frame-extent-swapped", "physical frame", IMAGING,
           "        return rows * float(self.spacing[0]) / field_mm, cols * float(self.spacing[1]) / field_mm",
           "        return rows * float(self.spacing[1]) / field_mm, cols * float(self.spacing[0]) / field_mm",
           "row and column spacing swapped in the slice's extent"),
    Mutant("engine-extent-dropped", "physical frame", PLACEMENT,
           "    extent = image.frame_extent(config.field_of_view_mm)\n",
           "    extent = None\n", "the engine frames every slice as filling the frame"),
    Mutant("reference-box-extent-dropped", "physical frame", PROCESSING,
           "torch.tensor(frame_box(box, (h, w), extent), dtype=torch.float32)",
           "torch.tensor(frame_box(box, (h, w)), dtype=torch.float32)",
           "the reference box placed as if the slice filled the frame"),
    Mutant("cache-key-without-extent", "physical frame", "MediRoundCore/engine.py",
           "_rounded(image.frame_extent(config.field_of_view_mm)),", "None,",
           "the slice cache ignores the extent (same pixels, other spacing reuse the old encoding)"),
    Mutant("slice-range-negative", "range check", IMAGING,
           "if not 0 <= index < n:", "if not -1 <= index < n:", "index -1 accepted (the last slice, silently)"),
    Mutant("no-reference-first-round", "reference precedence", REFERENCES,
           "or max(number for number, usable in enumerate(ok, start=1) if usable))", "or 1)",
           "nothing named and no scorer: the first round instead of the previous one"),
    Mutant("scorer-ignored", "reference precedence", REFERENCES,
           "return ((scorer.choose(query, entities, ok) if scorer is not None else None)",
           "return ((None if scorer is not None else None)",
           "the model's reference scorer ignored (the previous round always)"),
    Mutant("round-number-off-by-one", "reference precedence", REFERENCES,
           "return number if 1 <= number <= n else None", "return number - 1 if 1 < number <= n else None",
           "'round N' read as round N-1"),
    Mutant("ras-lps-sign", "slicer geometry", IMAGING,
           "lps = np.diag([-1.0, -1.0, 1.0]) @ m[:3, :3]", "lps = np.diag([1.0, -1.0, 1.0]) @ m[:3, :3]",
           "Slicer's RAS read as LPS on one axis"),
    Mutant("plane-rounding", "slicer geometry", GEOMETRY,
           "index = int(np.floor(offset + 0.5 + 1e-6))", "index = int(np.floor(offset + 1e-6))",
           "the view's plane truncated instead of rounded to a voxel plane"),
    # -- the language model's one-token step (model/decode_step.py): what the model answers ------------------
    Mutant("decode-rope-sign", "answer decoding", DECODE_STEP,
           "return torch.cat((-x[..., half:], x[..., :half]), dim=-1)",
           "return torch.cat((x[..., half:], -x[..., :half]), dim=-1)",
           "the rotary embedding turns the other way in the one-token step"),
    Mutant("decode-gqa-tiled", "answer decoding", DECODE_STEP,
           "keys = keys.repeat_interleave(self.heads // self.kv_heads, dim=1)",
           "keys = keys.repeat(1, self.heads // self.kv_heads, 1, 1)",
           "key heads tiled instead of grouped (query head 1 reads key head 1, not 0)"),
    Mutant("decode-position-next", "answer decoding", "MediRoundCore/engine.py",
           "logits, hidden = step(embeds, state.cache, state.cache_len)",
           "logits, hidden = step(embeds, state.cache, state.cache_len + 1)",
           "each answer token encoded one position too far"),
    # -- a slice's place in the model's field (model/field_placement.py, imaging.py) ---------------------------
    Mutant("placement-wrong-side", "placement", PLACEMENT,
           "pads += [(wanted, 0) if offset > 0 else (0, wanted)]",
           "pads += [(0, wanted) if offset > 0 else (wanted, 0)]",
           "a crop padded on the side away from its place (mirrored about the field's centre)"),
    Mutant("placement-centre-unflipped", "placement", IMAGING,
           "right = volume.direction[:, col_axis] * (-1.0 if flip_cols else 1.0)",
           "right = volume.direction[:, col_axis]",
           "a slice's place read along the stored column axis, not the displayed one (flipped volumes)"),
    Mutant("placement-unpad-late", "placement", PLACEMENT,
           "return array[..., self.top:h - self.bottom, self.left:w - self.right]",
           "return array[..., self.bottom:h - self.top, self.right:w - self.left]",
           "the padding taken off the mask from the wrong sides"),
    Mutant("placement-not-trained", "placement", "MediRoundCore/train/batching.py",
           'shift = (sample.meta or {}).get("frame_shift") if extent is not None else None',
           "shift = None",
           "training crops shown centred while the engine shows a scan's crop at its place"),
]


def copy_tree(dest: Path) -> None:
    """The checkout's files (tracked and untracked, not ignored) into `dest`."""
    names = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=ROOT, check=True,
                           capture_output=True).stdout.decode().split("\0")
    for name in filter(None, names):
        src = ROOT / name
        if src.is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / name)


def run_tests(tree: Path, tests: list[str], timeout: int) -> tuple[str, str, float]:
    """('passed' | 'failed' | 'timeout', first failing test or '', seconds)."""
    env = {**os.environ, "PYTHONPATH": str(tree), "QT_QPA_PLATFORM": "offscreen", "PYTHONDONTWRITEBYTECODE": "1"}
    # One seed for every run and no examples carried from one mutant's run to the next: a kill never depends on
    # which random examples a run drew, or on a failing example another mutant left in hypothesis' database.
    cmd = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", "-W", "ignore", "-rfE",
           "--hypothesis-seed=0", *tests]
    shutil.rmtree(tree / ".hypothesis", ignore_errors=True)
    t0 = time.perf_counter()
    try:
        done = subprocess.run(cmd, cwd=tree, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return "timeout", "", time.perf_counter() - t0
    seconds = time.perf_counter() - t0
    failed = [line.split(" ", 1)[1].split(" - ")[0] for line in done.stdout.splitlines()
              if line.startswith(("FAILED ", "ERROR "))]
    if done.returncode == 0:
        return "passed", "", seconds
    return "failed", failed[0] if failed else f"pytest exit {done.returncode}", seconds


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "MUTATION.md"))
    parser.add_argument("--only", nargs="*", help="mutant ids to run (default: all)")
    parser.add_argument("--tests", nargs="*", default=GUARD_TESTS)
    parser.add_argument("--timeout", type=int, default=900, help="seconds per mutant")
    args = parser.parse_args(argv)
    mutants = [m for m in MUTANTS if not args.only or m.id in args.only]
    rows, started = [], time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    with tempfile.TemporaryDirectory(prefix="mediround-mutation-") as tmp:
        tree = Path(tmp)
        copy_tree(tree)
        status, first, seconds = run_tests(tree, args.tests, args.timeout)
        print(f"baseline: {status} ({seconds:.0f} s) {first}", flush=True)
        if status != "passed":
            print("the guard tests fail without any mutant: fix them first", file=sys.stderr)
            return 1
        for m in mutants:
            path = tree / m.path
            original = path.read_text()
            count = original.count(m.old)
            if count != 1:
                rows.append((m, "NOT APPLIED", f"the code to mutate occurs {count} times (code changed?)", 0.0))
                print(f"{m.id}: not applied ({count} occurrences)", flush=True)
                continue
            path.write_text(original.replace(m.old, m.new))
            try:
                status, first, seconds = run_tests(tree, args.tests, args.timeout)
            finally:
                path.write_text(original)
            verdict = {"failed": "killed", "passed": "SURVIVED", "timeout": "killed (timeout)"}[status]
            rows.append((m, verdict, first, seconds))
            print(f"{m.id}: {verdict} {first} ({seconds:.0f} s)", flush=True)
    write_report(Path(args.out), rows, args.tests, started)
    return 0


def write_report(out: Path, rows, tests, started: str) -> None:
    import torch

    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                            text=True).stdout.strip()
    dirty = bool(subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                                capture_output=True, text=True).stdout.strip())
    killed = sum(r[1].startswith("killed") for r in rows)
    applied = sum(r[1] != "NOT APPLIED" for r in rows)
    issue = [r for r in rows if r[0].from_issue]
    lines = [
        "# Mutation check: where masks land and what the model sees",
        "",
        f"Written by `benchmarks/mutation.py` (started {started}, commit {commit}{' + local changes' if dirty else ''}, "
        f"Python {platform.python_version()}, torch {torch.__version__}). Each mutant is one bug put into a copy "
        "of the tree; the guard tests run with `-x`; *killed* names the first test that failed.",
        "",
        f"**{killed} of {applied} mutants killed**; of the issue's bugs: "
        f"{sum(r[1].startswith('killed') for r in issue)} of {sum(r[1] != 'NOT APPLIED' for r in issue)}"
        + (f"; **{len(rows) - applied} not applied** (the code they target changed: update them)."
           if applied < len(rows) else "."),
        "",
        "Guard tests: " + ", ".join(f"`{t}`" for t in tests) + ".",
        "",
        "| mutant | kind | file | bug | result | first failing test | s |",
        "|---|---|---|---|---|---|---|",
    ]
    for m, verdict, first, seconds in rows:
        lines.append(f"| `{m.id}`{' (issue)' if m.from_issue else ''} | {m.kind} | `{m.path}` | {m.what} | "
                     f"**{verdict}** | {('`' + first + '`') if first else '–'} | {seconds:.0f} |")
    out.write_text("\n".join(lines) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    sys.exit(main())
