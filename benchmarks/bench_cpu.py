"""CPU benchmark of MediRound inference (issue 13); `mediround bench [args]` runs this script.

    mediround bench                                   # the shipped model, 30 runs, results in benchmarks/
    mediround bench -- --runs 10                      # options after `--`
    python benchmarks/bench_cpu.py --checkpoint DIR   # another checkpoint folder of ours
    python benchmarks/bench_cpu.py --runs 5 --warmup 1 --growth-repeats 1 --out /tmp/bench   # a quick try

What it measures, on a 512×512 CT slice (int16 HU, the anatomy of a generated 20-round dialogue rendered at
512²), end to end: slice extraction from the volume, windowing, resizing to the encoders' inputs, the model, the
mask back at slice size.
  1. The first Ask on a slice (a fresh slice cache every run, so both image encoders run) and later rounds on
     the same slice, median / min / max over `--runs` runs after `--warmup` runs, with the engine's breakdown
     (`round.timings`), the answer length and the time per answer token.
  2. Cost growth over rounds 1..20 of the dialogue: our engine (KV cache kept per slice) against the naive
     re-run of the whole conversation every round (`Engine(..., reuse_cache=False)`), same model, same process,
     interleaved round by round; latency and the tokens the language model processed, split into the prompt side
     and the generated answer.
  3. The Ask on a slice encoded ahead: `Engine.prepare` (what the panel runs while the user types or scrolls),
     then the first Ask, each timed.
  4. Peak resident memory (getrusage).
It writes the `<!-- cpu -->` section of RESULTS.md, `cpu_rounds.csv` and `cpu_rounds.png` in `--out`; a model of
another size than tiny (`lite`, the shipped default, and `full`) gets its own section (`<!-- cpu-lite -->`,
`cpu-lite_rounds.*`), and lite the issue's targets. Any tiny checkpoint writes the `cpu` section: measure an
unshipped one with `--out` elsewhere.
"""

from __future__ import annotations

import argparse
import csv
import gc
import math
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _bench import (TIMING_KEYS, ForwardTimer, command_line, fmt, machine_info, peak_rss_mib,  # noqa: E402
                    round_record, summary, table, verdict, write_section)

from MediRoundCore.engine import DEFAULT_CHECKPOINT, Engine  # noqa: E402
from MediRoundCore.imaging import Volume, extract_slice, normalize_intensity  # noqa: E402
from MediRoundCore.session import Session  # noqa: E402

TARGET_FIRST_MS = 150.0
TARGET_LATER_MS = 50.0
TARGET_GROWTH = 1.2
# issue 23's targets for the default model on LiteMedSAM, whose encoder alone takes about 1 s per slice here
TARGETS_BY_SIZE = {"lite": {"first": 1500.0, "later": 80.0}}
TARGET_PREPARED_MS = 300.0  # an Ask on a slice encoded ahead (`Engine.prepare`, while the user typed or scrolled)
# the lesion counts `long_dialogue` draws its slice with (to render the same anatomy at 512²; checked below)
_LONG_LESIONS = {"liver": 2, "spleen": 2, "left kidney": 2, "right kidney": 2, "force_gallbladder": 1}


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="mediround bench", description=__doc__.split("\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", help=f"checkpoint folder of ours (default: {DEFAULT_CHECKPOINT.name}, the "
                                         "shipped model; a random tiny model, said so, when it is missing)")
    ap.add_argument("--random", action="store_true", help="use an untrained tiny model (tests, no weights)")
    ap.add_argument("--runs", type=int, default=30, help="timed runs of the first/later-round benchmark (30)")
    ap.add_argument("--warmup", type=int, default=3, help="untimed runs before them (3)")
    ap.add_argument("--later", type=int, default=4, help="later rounds per run (rounds 2..1+LATER; 4)")
    ap.add_argument("--rounds", type=int, default=20, help="rounds of the cost-growth dialogue (20)")
    ap.add_argument("--growth-repeats", type=int, default=5, help="times the growth dialogue is run; per-round "
                                                                  "medians (5)")
    ap.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (2)")
    ap.add_argument("--size", type=int, default=512, help="slice size in pixels (512)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the generated dialogue (0)")
    ap.add_argument("--max-answer-tokens", type=int, default=None,
                    help="cap the answer length (tests only; default: the model's own limit)")
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent),
                    help="folder for RESULTS.md, cpu_rounds.csv and cpu_rounds.png (default: benchmarks/)")
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--"]:  # `mediround bench -- --runs 5`: the CLI passes the separator on
        argv = argv[1:]
    args = ap.parse_args(argv)
    for name in ("runs", "rounds", "growth_repeats", "threads", "size"):
        if getattr(args, name) < 1:
            ap.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.warmup < 0 or args.later < 0:
        ap.error("--warmup and --later must not be negative")
    if args.rounds < 2:
        ap.error("--rounds must be at least 2 (growth is round N against round 2)")
    return args


# -- inputs ---------------------------------------------------------------------------------------------------
def load_engine(checkpoint: str | None, force_random: bool, seed: int = 0) -> tuple[Engine, str, bool]:
    """(engine on CPU, description, is_random). Without --checkpoint the shipped model; if its weights are missing,
    a random tiny model (the description says so)."""
    if force_random:
        return Engine.random_tiny(seed), "random tiny model (untrained; `--random`)", True
    if checkpoint is None and not (DEFAULT_CHECKPOINT / "model.safetensors").is_file():
        note = (f"random tiny model (untrained): the shipped weights "
                f"`MediRoundCore/weights/{DEFAULT_CHECKPOINT.name}/model.safetensors` are missing on this machine")
        return Engine.random_tiny(seed), note, True
    engine = Engine.load(checkpoint, device="cpu")
    folder = Path(checkpoint) if checkpoint else DEFAULT_CHECKPOINT
    name = f"`{folder}`" if checkpoint else f"the shipped model (`MediRoundCore/weights/{DEFAULT_CHECKPOINT.name}`)"
    return engine, f"{name}, {engine.model.config.size} size, float32", False


def dialogue_and_volume(seed: int, n_rounds: int, size: int):
    """The generated long dialogue and its slice as a one-slice CT volume (int16 HU) of size×size.

    The dialogue's anatomy is rendered again at `size` from its seed (real HU: air, fat, bone); if that does not
    reproduce the dialogue's slice (correlation < 0.95 after downsampling), the dialogue's 256² display image is
    resampled instead and mapped back to HU through the engine's CT window."""
    import torch.nn.functional as F

    from MediRoundCore.data.anatomy import generate_slice
    from MediRoundCore.data.splits import long_dialogue

    sample = long_dialogue(seed, n_rounds=max(n_rounds, 2))
    meta = sample.meta
    h, w = sample.image.shape
    source = None
    try:
        sl = generate_slice(meta["region"], meta["seed"], modality=meta["modality"], size=size,
                            noise_level=meta["noise_level"], contrast=meta["contrast"], lesions=_LONG_LESIONS)
        shown = torch.from_numpy(normalize_intensity(sl.image, "CT"))[None, None]
        small = F.interpolate(shown, size=(h, w), mode="area")[0, 0].numpy()
        if sl.modality == "CT" and np.corrcoef(small.ravel(), sample.image.ravel())[0, 1] >= 0.95:
            hu = np.round(sl.image).astype(np.int16)
            spacing = sl.spacing_mm
            source = f"the dialogue's anatomy rendered at {size}² (seed {meta['seed']}), int16 HU"
    except (KeyError, ValueError, TypeError):
        pass
    if source is None:
        from MediRoundCore.imaging import CT_WINDOW

        up = F.interpolate(torch.from_numpy(sample.image)[None, None], size=(size, size), mode="bilinear",
                           align_corners=False)[0, 0].numpy()
        level, width = CT_WINDOW
        hu = np.round(level - width / 2 + np.clip(up, 0, 1) * width).astype(np.int16)
        spacing = 0.75 * 256 / size
        source = f"the dialogue's {h}×{w} display image resampled to {size}² and mapped to HU (window {level:g}/{width:g})"
    volume = Volume(hu[None], (spacing, spacing, 5.0), (0.0, 0.0, 0.0), modality="CT", name="bench_slice")
    refs = [None if r is None else int(r) + 1 for r in sample.ref_indices]
    return sample.queries[:n_rounds], refs[:n_rounds], volume, source


def _ask(engine, timer, session, volume, query, reference) -> dict:
    timer.clear()
    t = time.perf_counter()
    image = extract_slice(volume, "axial", 0)
    result = engine.ask(session, query, image, reference=reference)
    wall = (time.perf_counter() - t) * 1000
    # the user turn as the engine feeds it (round tags name the referenced round and its structure)
    query_tokens = len(engine._user_turn(session, " ".join(query.split()), result.round.reference,
                                         result.round.number))
    return round_record(result, timer.calls, wall, query_tokens)


# -- 1. first Ask and later rounds ---------------------------------------------------------------------------
def bench_asks(engine: Engine, volume: Volume, queries, refs, runs: int, warmup: int, later: int,
               timer: ForwardTimer | None = None) -> dict:
    """First Ask on a fresh slice cache, then `later` rounds on the same slice; `runs` timed repetitions."""
    timer = timer or ForwardTimer(engine)
    fingerprint = volume.fingerprint()
    first, later_rows = [], []
    for i in range(warmup + runs):
        engine.forget()  # a fresh slice key: the encoders and the image prefix run again
        session = Session(fingerprint, volume_name=volume.name)
        session.volume = volume
        gc.collect()
        for k in range(1 + later):
            q = queries[k % len(queries)]
            ref = refs[k % len(refs)] if k < len(refs) else None
            rec = _ask(engine, timer, session, volume, q, ref)
            if i >= warmup:
                (first if k == 0 else later_rows).append(rec)
    return {"first": first, "later": later_rows}


def bench_prepared(engine: Engine, volume: Volume, query: str, runs: int, warmup: int,
                   timer: ForwardTimer | None = None) -> list[dict]:
    """`Engine.prepare` on a fresh slice cache, then the first Ask; `runs` timed repetitions. Each record is the
    Ask's (`round_record`) with the prepare's wall time added as `prepare_ms`."""
    timer = timer or ForwardTimer(engine)
    fingerprint = volume.fingerprint()
    rows = []
    for i in range(warmup + runs):
        engine.forget()
        session = Session(fingerprint, volume_name=volume.name)
        session.volume = volume
        gc.collect()
        t = time.perf_counter()
        engine.prepare(session, extract_slice(volume, "axial", 0))
        prepare_ms = (time.perf_counter() - t) * 1000
        rec = _ask(engine, timer, session, volume, query, None)
        rec["prepare_ms"] = prepare_ms
        if i >= warmup:
            rows.append(rec)
    return rows


# -- 2. cost growth -------------------------------------------------------------------------------------------
def bench_growth(engine: Engine, volume: Volume, queries, refs, repeats: int) -> dict:
    """Rounds 1..N with our engine and with the naive re-run, interleaved round by round; per-round medians."""
    # both decode one token per forward (no answer drafts, whose hits vary from round to round): the time per
    # answer token then measures what the growing cache costs
    engines = {"ours": Engine(engine.model, engine.tokenizer, reuse_cache=True, reference_scorer=engine.reference_scorer),
               "naive": Engine(engine.model, engine.tokenizer, reuse_cache=False)}
    timers = {mode: ForwardTimer(e) for mode, e in engines.items()}
    fingerprint = volume.fingerprint()
    n = len(queries)
    raw = {mode: [[] for _ in range(n)] for mode in engines}
    for _ in range(repeats):
        sessions = {}
        for mode, e in engines.items():
            e.forget()
            sessions[mode] = Session(fingerprint, volume_name=volume.name)
            sessions[mode].volume = volume
        gc.collect()
        for k in range(n):
            order = list(engines) if k % 2 == 0 else list(engines)[::-1]
            for mode in order:
                raw[mode][k].append(_ask(engines[mode], timers[mode], sessions[mode], volume, queries[k], refs[k]))
    rows = {mode: [_median_round(recs) for recs in per_round] for mode, per_round in raw.items()}
    same = [all(a["answer"] == b["answer"] for a, b in zip(raw["ours"][k], raw["naive"][k])) for k in range(n)]
    fixed = _fixed_answer_length(rows)
    for mode in rows:
        fallback = _nanmedian([r["decode_ms_per_token"] for r in rows[mode]])
        for r, ok in zip(rows[mode], same):
            per_token = r["decode_ms_per_token"] if not math.isnan(r["decode_ms_per_token"]) else fallback
            decode = r["decode_ms"] if not math.isnan(r["decode_ms"]) else 0.0
            r["latency_fixed_answer_ms"] = r["wall_ms"] - decode + fixed * (per_token if not math.isnan(per_token) else 0.0)
            r["reread_tokens"] = r["prompt_tokens"] - r["query_tokens"] - (2 if r["round"] > 1 else 0)
            r["answers_match"] = ok
    return {"rows": rows, "fixed_answer_tokens": fixed, "answers_match": all(same), "repeats": repeats}


def _median_round(recs: list[dict]) -> dict:
    out = dict(recs[0])
    for key, value in recs[0].items():
        if isinstance(value, float):
            out[key] = _nanmedian([r[key] for r in recs])
    out["wall_ms_min"] = min(r["wall_ms"] for r in recs)
    out["wall_ms_max"] = max(r["wall_ms"] for r in recs)
    # token counts are deterministic (greedy decoding); keep the first repeat's and flag any difference
    out["tokens_stable"] = len({(r["lm_tokens"], r["answer_tokens"]) for r in recs}) == 1
    return out


def _nanmedian(values) -> float:
    values = [v for v in values if not (isinstance(v, float) and math.isnan(v))]
    return statistics.median(values) if values else float("nan")


def _fixed_answer_length(rows) -> int:
    """The median answer length of our rounds 2..N: latencies are also compared as if every answer had it."""
    lengths = [r["answer_tokens"] for r in rows["ours"][1:]] or [0]
    return int(round(statistics.median(lengths)))


def growth_ratios(growth: dict) -> dict:
    """Round N / round 2, for both engines."""
    out = {}
    for mode, rows in growth["rows"].items():
        a, b = rows[1], rows[-1]
        ratio = lambda key: (b[key] / a[key]) if a[key] else float("nan")  # noqa: E731
        out[mode] = {key: ratio(key) for key in ("wall_ms", "latency_fixed_answer_ms", "lm_tokens", "prompt_tokens",
                                                 "prompt_ms", "decode_ms_per_token")}
        out[mode]["last"] = b["round"]
    return out


# -- outputs --------------------------------------------------------------------------------------------------
CSV_FIELDS = ["mode", "round", "query_tokens", "prompt_tokens", "reread_tokens", "answer_tokens", "lm_tokens",
              "first_forward_tokens", "wall_ms", "wall_ms_min", "wall_ms_max", "latency_fixed_answer_ms", "prompt_ms",
              "decode_ms", "decode_ms_per_token", *TIMING_KEYS, "other_engine_ms", "outside_engine_ms",
              "answers_match", "tokens_stable", "seg_forced"]


def write_csv(path: Path, growth: dict) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_FIELDS, extrasaction="ignore")
        writer.writeheader()
        for mode, rows in growth["rows"].items():
            for r in rows:
                writer.writerow({"mode": mode, **{k: (f"{v:.3f}" if isinstance(v, float) else v) for k, v in r.items()}})


def plot(path: Path, growth: dict, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = growth["rows"]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.6))
    colors = {"ours": "tab:blue", "naive": "tab:red"}
    labels = {"ours": "ours (KV cache kept)", "naive": "naive re-run"}
    for mode, rs in rows.items():
        x = [r["round"] for r in rs]
        ax1.plot(x, [r["wall_ms"] for r in rs], "o-", color=colors[mode], label=f"{labels[mode]}: measured")
        ax1.fill_between(x, [r["wall_ms_min"] for r in rs], [r["wall_ms_max"] for r in rs], color=colors[mode],
                         alpha=0.15)
        ax1.plot(x, [r["latency_fixed_answer_ms"] for r in rs], "--", color=colors[mode],
                 label=f"{labels[mode]}: at {growth['fixed_answer_tokens']} answer tokens")
        ax2.plot(x, [r["lm_tokens"] for r in rs], "o-", color=colors[mode], label=f"{labels[mode]}: all LM tokens")
        ax2.plot(x, [r["prompt_tokens"] for r in rs], "s--", color=colors[mode], label=f"{labels[mode]}: prompt side")
    ax1.set(xlabel="round", ylabel="latency per round (ms)", title="Latency per round (median, min–max band)")
    ax1.set_ylim(bottom=0)
    ax2.set(xlabel="round", ylabel="tokens through the language model",
            title="Tokens processed per round")
    ax2.set_ylim(bottom=0)
    for ax in (ax1, ax2):
        ax.set_xticks(range(1, len(rows["ours"]) + 1))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _stat_cells(values, digits=1) -> list[str]:
    s = summary(values)
    return [fmt(s["median"], digits), f"{fmt(s['min'], digits)} – {fmt(s['max'], digits)}"]


def _int_range(values) -> str:
    values = [int(v) for v in values]
    if not values:
        return "–"
    med = statistics.median(values)
    return f"{fmt(float(med), 1 if med != int(med) else 0)} ({min(values)}–{max(values)})"


def breakdown_rows(asks: dict) -> list[list]:
    parts = [("slice extraction (volume → display slice)", "outside_engine_ms"),
             ("segmenter image encoder (incl. windowing, resize)", "segmenter_encoder_ms"),
             ("vision tower + projector (image tokens)", "vision_tower_ms"),
             ("image prefix through the language model", "prefix_ms"),
             ("language model: query + answer decoding", "language_model_ms"),
             ("  of which: prompt forward", "prompt_ms_lm"),
             ("  of which: answer decoding", "decode_ms"),
             ("mask decoder (+ JCM, mask to slice size)", "mask_decoder_ms"),
             ("other (reference crop/box features, tokenising)", "other_engine_ms")]
    out = []
    totals = {k: statistics.median([r["wall_ms"] for r in asks[k]]) if asks[k] else float("nan")
              for k in ("first", "later")}
    for label, key in parts:
        row = [label]
        for kind in ("first", "later"):
            recs = asks[kind]
            if not recs:
                row += ["–", "–"]
                continue
            if key == "prompt_ms_lm":  # the query's forward (the prefix forward is its own line)
                vals = [r["language_model_ms"] - r["decode_ms"] for r in recs]
            else:
                vals = [r[key] for r in recs]
            med = _nanmedian([float(v) for v in vals])
            row += [fmt(med), f"{100 * med / totals[kind]:.0f} %" if totals[kind] and not math.isnan(med) else "–"]
        out.append(row)
    return out


def explain_first(recs, target) -> str:
    med = {k: _nanmedian([float(r[k]) for r in recs]) for k in
           ("wall_ms", "segmenter_encoder_ms", "vision_tower_ms", "prefix_ms", "language_model_ms", "decode_ms",
            "mask_decoder_ms", "answer_tokens", "decode_ms_per_token")}
    fixed = med["segmenter_encoder_ms"] + med["vision_tower_ms"] + med["prefix_ms"] + med["mask_decoder_ms"]
    parts = sorted([("segmenter encoder", med["segmenter_encoder_ms"]), ("vision tower", med["vision_tower_ms"]),
                    ("image prefix forward", med["prefix_ms"]), ("answer decoding", med["decode_ms"]),
                    ("mask decoder", med["mask_decoder_ms"])], key=lambda p: -p[1])
    text = (f"First Ask: median {med['wall_ms']:.0f} ms against {target:.0f} ms. Largest parts: "
            + ", ".join(f"{n} {v:.0f} ms" for n, v in parts[:3]) + ". ")
    if fixed >= target:
        text += (f"The once-per-slice work alone (encoders, image prefix, mask decoder: {fixed:.0f} ms) exceeds the "
                 f"target, whatever the answer length. What would reach it: start encoding the slice when the user "
                 f"moves to it (the Slicer module can call the engine before the Ask, so the Ask becomes a later "
                 f"round), and/or a smaller segmenter input or int8 dynamic quantisation of the encoders' Linear "
                 f"layers.")
    else:
        per = med["decode_ms_per_token"]
        budget = target - (med["wall_ms"] - med["decode_ms"])
        text += f"Without answer decoding it takes {med['wall_ms'] - med['decode_ms']:.0f} ms"
        text += (f"; the rest is {med['answer_tokens']:.0f} answer tokens at {per:.1f} ms each. " if per == per
                 else " (no answer tokens were generated). ")
        if budget <= 0:
            text += ("The work besides decoding alone exceeds the target; the encoders, the image prefix and the "
                     "query forward need to be faster.")
        elif per == per and per > 0:
            text += (f"At this speed the target allows about {int(budget // per)} answer tokens: shorter answers "
                     f"(a trained model names the entity in a few tokens) or faster decoding steps would reach it.")
    return text


def explain_later(recs, target) -> str:
    med = {k: _nanmedian([float(r[k]) for r in recs]) for k in
           ("wall_ms", "decode_ms", "answer_tokens", "decode_ms_per_token", "mask_decoder_ms", "other_engine_ms",
            "language_model_ms")}
    rest = med["wall_ms"] - med["decode_ms"]
    per = med["decode_ms_per_token"]
    decoding = (f"{med['decode_ms']:.0f} ms ({med['answer_tokens']:.0f} tokens × {per:.1f} ms)" if per == per
                else "no time (no answer tokens)")
    text = (f"Later rounds: median {med['wall_ms']:.0f} ms against {target:.0f} ms; answer decoding takes "
            f"{decoding}, everything else "
            f"{rest:.0f} ms (mask decoder {med['mask_decoder_ms']:.0f} ms, reference crop/box features and "
            f"bookkeeping {med['other_engine_ms']:.0f} ms). ")
    if rest >= target:
        text += ("Even a one-token answer would miss: the fixed per-round work (prompt forward, the reference crop "
                 "through the vision tower, mask decoder) has to get faster first.")
    elif not (per == per and per > 0):
        text += "No answer tokens were generated in these rounds: the per-round work itself has to get faster."
    else:
        text += (f"The target leaves {target - rest:.0f} ms for the answer, about {int((target - rest) // per)} "
                 f"tokens at this speed: the answer length decides. A trained model that names the entity and "
                 f"stops (or an answer-length cap) would reach it; so would faster decoding (fewer forwards: "
                 f"longer accepted drafts; or a cheaper step).")
    return text


def drafts_note(engine) -> str:
    """How this engine decodes answers: with the checkpoint's answer drafts, or one token per forward."""
    drafts = getattr(engine, "answer_drafts", None)
    if drafts is None:
        return "this checkpoint has no `answer_drafts.json`: one token per forward"
    return (f"`answer_drafts.json`, {len(drafts.table)} contexts; drafts of up to {drafts.max_tokens} tokens, "
            f"each continuation seen at least {drafts.min_share:.0%} of the time; the answer stays greedy "
            f"decoding's")


def targets_for(size: str) -> dict:
    """Latency targets (ms) of a model size: the tiny model's own, or the issue's for `lite`."""
    return {"first": TARGET_FIRST_MS, "later": TARGET_LATER_MS, "prepared": TARGET_PREPARED_MS,
            **TARGETS_BY_SIZE.get(size, {})}


def section_name(size: str) -> str:
    """RESULTS.md section of a model size: `cpu` for tiny (the previous default), `cpu-<size>` for the others."""
    return "cpu" if size == "tiny" else f"cpu-{size}"


def render_section(info: dict, model_desc: str, is_random: bool, params: int, args, source: str, asks: dict,
                   growth: dict, ratios: dict, memory: dict, files: dict, size: str = "tiny",
                   decoding: str = "") -> str:
    target = targets_for(size)
    first_med = summary([r["wall_ms"] for r in asks["first"]])["median"]
    later_med = summary([r["wall_ms"] for r in asks["later"]])["median"]
    prepared = asks.get("prepared") or []
    prepared_med = summary([r["wall_ms"] for r in prepared])["median"] if prepared else float("nan")
    ours, naive = growth["rows"]["ours"], growth["rows"]["naive"]
    last = ours[-1]["round"]
    r_ours, r_naive = ratios["ours"], ratios["naive"]
    no_reread = all(r["reread_tokens"] == 0 for r in ours[1:])
    L = []
    L.append("## CPU" + ("" if size == "tiny" else f": the {size} model") + "\n")
    L.append(f"- Machine: {info['cpu']}, {info['cores']} core(s) available to the process, "
             f"`torch.set_num_threads({info['threads']})`, torch {info['torch']}, Python {info['python']}, "
             f"{info['platform']}; OpenMP wait policy: {os.environ.get('OMP_WAIT_POLICY') or 'default, as in Slicer'}"
             " (our training scripts set PASSIVE to share the cores; it makes every small step slower).")
    L.append(f"- Load average (1/5/15 min) at start: {info['load']}; at the end: {memory['load_end']}. "
             "Figures from a machine with other work running are not final.")
    L.append(f"- Model: {model_desc}; {params / 1e6:.1f} M parameters.")
    if is_random:
        L.append("- **The model is untrained (random weights)**: its answers are not the trained model's. It rarely "
                 "produces `[SEG]`, so most answers run to the token limit "
                 f"({growth.get('max_answer_tokens', '?')}) and are closed with `[SEG]`; the answer lengths below, "
                 "and the later-round latencies they drive, say little about the shipped model.")
    L.append(f"- Command: `{info['command']}` ({info['date']}, git {info['git']}).")
    L.append(f"- Slice: {args.size}×{args.size}, {source}; one-slice volume, axial view. Every time includes "
             "slice extraction from the volume, CT windowing, resizing to the encoders' inputs and the mask back "
             f"at {args.size}². Times are wall clock around `extract_slice` + `Engine.ask`.")
    L.append(f"- Runs: {args.runs} timed runs after {args.warmup} warm-up run(s); each run: a fresh slice cache "
             f"(`engine.forget()`) and a new session, round 1 (the first Ask) then rounds 2–{1 + args.later} "
             f"(later rounds) of the generated dialogue. Cost growth: the dialogue's {last} rounds, "
             f"{growth['repeats']} time(s), per-round medians.\n")

    L.append("### Targets\n")
    rows = [
        ["first Ask on a slice (median)", f"≤ {target['first']:.0f} ms", f"{fmt(first_med)} ms",
         verdict(first_med <= target["first"])],
        ["first Ask on a slice encoded ahead (`Engine.prepare` first; median)", f"≤ {target['prepared']:.0f} ms",
         f"{fmt(prepared_med)} ms", verdict(prepared_med <= target["prepared"])],
        ["later rounds, same slice (median)", f"≤ {target['later']:.0f} ms", f"{fmt(later_med)} ms",
         verdict(later_med <= target["later"])],
        [f"ours: latency round {last} / round 2, at equal answer length ({growth['fixed_answer_tokens']} tokens)",
         f"≤ {TARGET_GROWTH}", fmt(r_ours["latency_fixed_answer_ms"], 2),
         verdict(r_ours["latency_fixed_answer_ms"] <= TARGET_GROWTH)],
        [f"ours: latency round {last} / round 2, as measured (answers of {ours[1]['answer_tokens']} and "
         f"{ours[-1]['answer_tokens']} tokens)", f"≤ {TARGET_GROWTH}", fmt(r_ours["wall_ms"], 2),
         verdict(r_ours["wall_ms"] <= TARGET_GROWTH)],
        ["ours: history tokens re-read in rounds 2+", "0", str(max(r["reread_tokens"] for r in ours[1:])),
         verdict(no_reread)],
    ]
    L.append(table(["what", "target", "measured", ""], rows))
    L.append("")
    misses = []
    if not first_med <= target["first"]:
        misses.append(explain_first(asks["first"], target["first"]))
    if not prepared_med <= target["prepared"]:
        misses.append(f"Encoded ahead: the Ask after `Engine.prepare` took {fmt(prepared_med)} ms. What is left "
                      "after the prepare is round 1's query and answer and the slice's first mask decode (the "
                      "decoder's image side is made there), so it costs a little more than a later round (below).")
    if not later_med <= target["later"]:
        misses.append(explain_later(asks["later"], target["later"]))
    if not r_ours["latency_fixed_answer_ms"] <= TARGET_GROWTH:
        misses.append(f"Growth: at equal answer length round {last} takes {r_ours['latency_fixed_answer_ms']:.2f}× "
                      f"round 2 (prompt forward {fmt(r_ours['prompt_ms'], 2)}×, time per answer token "
                      f"{fmt(r_ours['decode_ms_per_token'], 2)}×). Our rounds feed only their new tokens (the prompt "
                      f"side stays flat), so what grows is the work per answer token: attention over the longer KV "
                      f"cache, and transformers' DynamicCache, which concatenates (copies) the whole cache at every "
                      f"step. A preallocated cache (transformers' StaticCache) would remove the copies; attention "
                      f"weighs most at tiny widths and far less at full size. Other load on the machine also shows "
                      f"here: rerun on a quiet machine with more `--growth-repeats`.")
    if misses:
        L.append("Where a target is missed, why, and what would reach it:\n")
        L += [f"- {m}" for m in misses]
        L.append("")

    L.append("### First Ask and later rounds\n")
    first, later = asks["first"], asks["later"]
    L.append(table(["", "first Ask", "later rounds"], [
        ["runs (timed)", str(len(first)), str(len(later))],
        ["latency median (ms)", fmt(first_med), fmt(later_med)],
        ["latency min – max (ms)", _stat_cells([r["wall_ms"] for r in first])[1],
         _stat_cells([r["wall_ms"] for r in later])[1]],
        ["answer tokens generated, median (min–max)", _int_range([r["answer_tokens"] for r in first]),
         _int_range([r["answer_tokens"] for r in later])],
        ["language-model forwards while decoding, median (min–max)", _int_range([r["decode_forwards"] for r in first]),
         _int_range([r["decode_forwards"] for r in later])],
        ["time per answer token, median (ms)", fmt(_nanmedian([r["decode_ms_per_token"] for r in first]), 2),
         fmt(_nanmedian([r["decode_ms_per_token"] for r in later]), 2)],
        ["tokens through the language model, median", _int_range([r["lm_tokens"] for r in first]),
         _int_range([r["lm_tokens"] for r in later])],
        ["answers closed without `[SEG]` from the model", f"{sum(r['seg_forced'] for r in first)} of {len(first)}",
         f"{sum(r['seg_forced'] for r in later)} of {len(later)}"],
    ]))
    if prepared:
        L.append(f"\nEncoded ahead ({len(prepared)} timed runs, each on a fresh slice cache and session): "
                 f"`Engine.prepare` median {fmt(summary([r['prepare_ms'] for r in prepared])['median'])} ms "
                 f"(not seen by the user: the panel runs it while the query is typed or the slice scrolled), then "
                 f"the first Ask median {fmt(prepared_med)} ms (min – max "
                 f"{_stat_cells([r['wall_ms'] for r in prepared])[1]}), answers of "
                 f"{_int_range([r['answer_tokens'] for r in prepared])} tokens.")
    L.append("\nWhere the time goes (medians of each part, so they need not add up to the median total; "
             "`round.timings` of the engine, the answer-decoding split from timing each language-model forward):\n")
    L.append(table(["part", "first Ask (ms)", "share", "later round (ms)", "share"], breakdown_rows(asks)))
    L.append(f"\nThe answer length dominates later rounds: the first answer token comes with the query's forward; "
             f"each later one takes a forward of its own, or shares it with the next ones when the model's answer "
             f"drafts are right ({decoding or 'one token per forward'}).\n")

    L.append(f"### Cost growth over a {last}-round dialogue\n")
    L.append(f"Rounds 1–{last} of the generated long dialogue (`long_dialogue(seed={args.seed})`, references as the "
             "dialogue gives them) on the slice above. *Ours*: the engine keeps the slice's KV cache, so a round "
             "feeds the previous answer's closing `[SEG]`+EOS and its own query, then decodes. *Naive*: "
             "`Engine(..., reuse_cache=False)` feeds the image prefix and the whole conversation again every round, "
             "as the public code does (its image encoders stay cached per slice, which favours it). Both decode one "
             "answer token per forward here (no answer drafts), so that the time per answer token shows what a "
             "longer cache costs. Same model, same process, rounds interleaved. *Prompt side* = every token fed before decoding (independent of the answer "
             "length); *LM tokens* adds one per generated answer token. Latency at equal answer length replaces "
             f"each round's decoding time by {growth['fixed_answer_tokens']} tokens × its own time per token. "
             f"Answers of the two engines identical in every round: {'yes' if growth['answers_match'] else '**no**'}.\n")
    trows = []
    for a, b in zip(ours, naive):
        trows.append([str(a["round"]), str(a["query_tokens"]), str(a["answer_tokens"]), str(a["prompt_tokens"]),
                      str(a["lm_tokens"]), fmt(a["wall_ms"]), fmt(a["latency_fixed_answer_ms"]),
                      str(b["prompt_tokens"]), str(b["lm_tokens"]), fmt(b["wall_ms"]), fmt(b["latency_fixed_answer_ms"])])
    L.append(table(["round", "query tok", "answer tok", "ours: prompt tok", "ours: LM tok", "ours: ms",
                    "ours: ms @ equal answer", "naive: prompt tok", "naive: LM tok", "naive: ms",
                    "naive: ms @ equal answer"], trows))
    L.append("")
    L.append(table([f"round {last} / round 2", "ours", "naive"], [
        ["latency as measured", fmt(r_ours["wall_ms"], 2), fmt(r_naive["wall_ms"], 2)],
        ["latency at equal answer length", fmt(r_ours["latency_fixed_answer_ms"], 2),
         fmt(r_naive["latency_fixed_answer_ms"], 2)],
        ["prompt-side tokens", fmt(r_ours["prompt_tokens"], 2), fmt(r_naive["prompt_tokens"], 2)],
        ["all LM tokens", fmt(r_ours["lm_tokens"], 2), fmt(r_naive["lm_tokens"], 2)],
        ["prompt forward time", fmt(r_ours["prompt_ms"], 2), fmt(r_naive["prompt_ms"], 2)],
        ["time per answer token", fmt(r_ours["decode_ms_per_token"], 2), fmt(r_naive["decode_ms_per_token"], 2)],
    ]))
    L.append(f"\nOur prompt side in round k ≥ 2 is 2 + the query's tokens (history tokens re-read: "
             f"{'none' if no_reread else 'some, see the CSV'}), so it differs between rounds only by the query "
             f"length; the naive prompt side grows by every earlier query and answer.\n")
    L.append(f"Per-round figures: [`{files['csv']}`]({files['csv']}); plot: [`{files['png']}`]({files['png']}).\n")
    L.append(f"![per-round latency and tokens]({files['png']})\n")

    L.append("### Memory\n")
    L.append(table(["when", "peak RSS (MiB)"], [
        ["model loaded", fmt(memory["loaded"])],
        ["after first Ask / later rounds", fmt(memory["asks"])],
        ["after cost growth (naive re-run included)", fmt(memory["growth"])],
    ]))
    L.append(f"\nPeak resident set size of the whole process (`resource.getrusage`, a high-water mark: Python, "
             f"torch and the data generator included). Model weights: {params / 1e6:.1f} M parameters × 4 bytes "
             f"(float32) = {params * 4 / 2**20:.0f} MiB.")
    return "\n".join(L) + "\n"


# -- main -----------------------------------------------------------------------------------------------------
def run(argv=None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    info = machine_info()
    info["command"] = command_line()
    engine, model_desc, is_random = load_engine(args.checkpoint, args.random, args.seed)
    if args.max_answer_tokens is not None:
        engine.model.config.max_answer_tokens = args.max_answer_tokens
        model_desc += f"; answers capped at {args.max_answer_tokens} tokens (`--max-answer-tokens`)"
    params = sum(p.numel() for p in engine.model.parameters())
    memory = {"loaded": peak_rss_mib()}
    queries, refs, volume, source = dialogue_and_volume(args.seed, args.rounds, args.size)
    say = lambda text: print(text, file=sys.stderr, flush=True)  # noqa: E731
    say(f"bench: {model_desc}; {args.size}² slice; {args.warmup}+{args.runs} runs × {1 + args.later} rounds")
    timer = ForwardTimer(engine)  # one wrapper of the engine's language-model forward for both measurements
    asks = bench_asks(engine, volume, queries, refs, args.runs, args.warmup, args.later, timer)
    asks["prepared"] = bench_prepared(engine, volume, queries[0], args.runs, args.warmup, timer)
    memory["asks"] = peak_rss_mib()
    say(f"bench: first Ask median {summary([r['wall_ms'] for r in asks['first']])['median']:.1f} ms, later rounds "
        f"{summary([r['wall_ms'] for r in asks['later']])['median']:.1f} ms; cost growth over {len(queries)} rounds")
    growth = bench_growth(engine, volume, queries, refs, args.growth_repeats)
    growth["max_answer_tokens"] = engine.model.config.max_answer_tokens
    memory["growth"] = peak_rss_mib()
    from _bench import _load

    memory["load_end"] = _load()
    ratios = growth_ratios(growth)
    size = engine.model.config.size
    name = section_name(size)
    files = {"csv": f"{name}_rounds.csv", "png": f"{name}_rounds.png"}
    write_csv(out / files["csv"], growth)
    short = model_desc.split(":")[0].split(";")[0].split(",")[0]
    plot(out / files["png"], growth, f"MediRound on CPU ({info['cpu']}, {info['threads']} threads), {short}, "
                                     f"{args.size}² slice, {growth['repeats']} repeat(s)")
    section = render_section(info, model_desc, is_random, params, args, source, asks, growth, ratios, memory, files,
                             size, drafts_note(engine))
    results = write_section(out / "RESULTS.md", name, section)
    say(f"bench: wrote {results}, {out / files['csv']}, {out / files['png']}")
    return {"args": args, "info": info, "model": model_desc, "random": is_random, "asks": asks, "growth": growth,
            "ratios": ratios, "memory": memory, "results": results, "builder": engine.builder,
            "queries": queries, "refs": refs}


def main(argv=None) -> int:
    run(argv)
    return 0


if __name__ == "__main__":
    sys.exit(main())
