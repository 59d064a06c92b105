"""GPU benchmark of the full-size MediRound (issue 13): the paper's architecture (`full_config()`: Mistral-7B,
CLIP ViT-L/14-336, MedSAM ViT-B at 1024²) with random weights, bf16, built directly on the GPU.

    python benchmarks/bench_gpu.py                       # 30 runs, results in benchmarks/RESULTS.md
    python benchmarks/bench_gpu.py --runs 5 --warmup 1 --out /tmp/bench
    python benchmarks/bench_gpu.py --tokenizer llava-med-v1.5-mistral-7b/   # the real Mistral tokenizer

Always (no GPU needed): the full model is constructed on the `meta` device (no memory allocated) and its
parameter count, the bf16 weight memory computed from it, the 4-bit weight memory estimated from it and the KV
cache per token are reported, labelled as computed.
With CUDA: first Ask (fresh slice cache) and later-round latency on a 512² CT slice (as `bench_cpu.py`, end to
end), peak GPU memory (`torch.cuda.max_memory_allocated`), bf16 and, when bitsandbytes is installed, with the
language model's Linear layers in 4-bit NF4. Random weights never choose to stop, so every answer is decoded to
`--answer-tokens` tokens (the model's answer-length limit is set to it); the time per answer token is reported
so that other answer lengths can be read off.
Without CUDA the GPU section of RESULTS.md says that no GPU was lent and that the measured figures are pending.
It writes the `<!-- gpu -->` section of RESULTS.md in `--out`.
"""

from __future__ import annotations

import argparse
import gc
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _bench import command_line, fmt, machine_info, summary, table, verdict, write_section  # noqa: E402

TARGET_LATER_MS = 150.0
TARGET_BF16_GB = 17.0
TARGET_4BIT_GB = 7.0
GB = 1e9


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--runs", type=int, default=30, help="timed runs (30)")
    ap.add_argument("--warmup", type=int, default=3, help="untimed runs before them (3)")
    ap.add_argument("--later", type=int, default=4, help="later rounds per run (4)")
    ap.add_argument("--answer-tokens", type=int, default=24,
                    help="answer length decoded by the random-weight model (24)")
    ap.add_argument("--growth-rounds", type=int, default=20,
                    help="rounds of the cost-growth dialogue on the GPU, ours vs the naive re-run (20; 0: skip)")
    ap.add_argument("--size", type=int, default=512, help="slice size (512)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--tokenizer", help="LLaVA-Med (Mistral) tokenizer folder; default: a stand-in byte-level "
                                        "BPE trained on the generated dialogues")
    ap.add_argument("--no-4bit", action="store_true", help="skip the 4-bit measurement")
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent), help="folder of RESULTS.md")
    args = ap.parse_args(argv)
    if args.runs < 1 or args.warmup < 0 or args.later < 1 or args.answer_tokens < 1 or args.growth_rounds < 0:
        ap.error("--runs, --later and --answer-tokens must be ≥ 1; --warmup and --growth-rounds ≥ 0")
    return args


# -- the model -------------------------------------------------------------------------------------------------
def placeholder_ids():
    """Token ids as our extended Mistral tokenizer has them ([SEG], <crop>, <box>, <image> after its 32000)."""
    from MediRoundCore.model.tokenizer import TokenIds

    return TokenIds(seg=32000, crop=32001, box=32002, image=32003, bos=1, eos=2, pad=0)


def build_full(device, token_ids, dtype=torch.bfloat16, config=None):
    """The full MediRound built directly on `device` in `dtype` (on `meta`: shapes only, nothing allocated)."""
    from MediRoundCore.model.config import full_config
    from MediRoundCore.model.modeling import MediRound

    config = config or full_config()
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = MediRound(config, token_ids)
    finally:
        torch.set_default_dtype(previous)
    return model.eval()


def _decoder_linears(model):
    """(parent, name, Linear) of the language model's decoder layers: what 4-bit loading quantises (the
    embeddings, lm_head, vision tower, projector and segmenter stay in bf16, as LLaVA/LISA 4-bit loading does)."""
    out = []
    for parent in model.language_model.model.modules():
        for name, child in parent.named_children():
            if isinstance(child, nn.Linear):
                out.append((parent, name, child))
    return out


def bf16_prompt_encoder_workaround(model) -> str | None:
    """segment_anything's `PositionEmbeddingRandom` builds its grid in float32 and multiplies it by its buffer, which
    `model.to(bfloat16)` (or a bf16 build) made bf16: the mask decoder then fails with a dtype mismatch. If this model
    has that problem, keep the buffer in float32 and hand the dense positional encoding to the decoder in the model's
    dtype (this instance only), and return a note saying so; None when the model needs nothing."""
    encoder = model.segmenter.prompt_encoder
    try:
        encoder.get_dense_pe()
        return None
    except RuntimeError as exc:
        if "dtype" not in str(exc):
            raise
        first = str(exc).splitlines()[0]
    layer = encoder.pe_layer
    layer.positional_encoding_gaussian_matrix = layer.positional_encoding_gaussian_matrix.float()
    dense_pe = encoder.get_dense_pe
    encoder.get_dense_pe = lambda: dense_pe().to(model.dtype)
    return (f"the mask decoder's positional encoding fails in {model.dtype} (`{first}`: segment_anything's "
            f"PositionEmbeddingRandom multiplies a float32 grid by its buffer, which the bf16 model holds in bf16); "
            f"the benchmark keeps that buffer in float32 and casts the encoding to the model's dtype, on this model "
            f"instance only. MediRoundCore needs the same fix for bf16 inference.")


def synchronize_parts(model) -> None:
    """CUDA runs asynchronously: without a synchronisation the engine's per-part timings (`round.timings`) would
    charge a part's GPU time to whichever later step waits for it. Wrap the encoders and the mask decoder of this
    model instance so each call returns only when its GPU work is done (the engine waits soon after anyway)."""
    for name in ("encode_segmenter_image", "encode_image_tokens", "encode_crops", "decode_masks"):
        inner = getattr(model, name)

        def synced(*args, _inner=inner, **kwargs):
            out = _inner(*args, **kwargs)
            torch.cuda.synchronize()
            return out

        setattr(model, name, synced)


def computed_figures(model) -> dict:
    """Sizes computed from the model's parameters (meta or real): counts per part, bf16 bytes, a 4-bit estimate
    (NF4 with double-quantised block statistics: 0.5 byte + 1/64 byte + 4/(64·256) byte per weight of the decoder's
    Linear layers, everything else bf16) and the KV cache per token."""
    parts = {name: sum(p.numel() for p in child.parameters()) for name, child in model.named_children()}
    total = sum(parts.values())
    buffers = sum(b.numel() * b.element_size() for b in model.buffers())
    quantised = sum(child.weight.numel() for _, _, child in _decoder_linears(model))
    nf4_bytes_per_weight = 0.5 + 1 / 64 + 4 / (64 * 256)
    text = model.config.text
    head_dim = text.hidden_size // text.num_attention_heads
    kv_per_token = 2 * text.num_hidden_layers * text.num_key_value_heads * head_dim * 2  # K and V, bf16
    return {"parts": parts, "total": total, "bf16_bytes": total * 2, "buffer_bytes": buffers,
            "quantised_weights": quantised,
            "nf4_bytes": (total - quantised) * 2 + quantised * nf4_bytes_per_weight,
            "kv_bytes_per_token": kv_per_token, "num_image_tokens": model.config.vision.num_patches}


def quantize_4bit(model) -> int:
    """Replace the decoder's Linear layers by bitsandbytes NF4 Linear4bit (bf16 compute), one at a time, so the
    bf16 weight of each is freed as soon as its 4-bit copy exists. Returns how many were replaced."""
    import bitsandbytes as bnb

    count = 0
    for parent, name, child in _decoder_linears(model):
        q = bnb.nn.Linear4bit(child.in_features, child.out_features, bias=child.bias is not None,
                              compute_dtype=torch.bfloat16, compress_statistics=True, quant_type="nf4",
                              device="meta")
        weight = bnb.nn.Params4bit(child.weight.data, requires_grad=False, compress_statistics=True,
                                   quant_type="nf4")
        q.weight = weight.to(child.weight.device)  # quantises on the GPU
        if child.bias is not None:
            q.bias = nn.Parameter(child.bias.data, requires_grad=False)
        setattr(parent, name, q)
        del child, weight
        count += 1
    gc.collect()
    torch.cuda.empty_cache()
    return count


def stand_in_tokenizer(seed: int = 0):
    """A byte-level BPE trained on generated dialogues (queries and answers), with our special tokens: used when
    the Mistral tokenizer is not on the machine. Token counts differ somewhat from Mistral's."""
    from MediRoundCore.data.splits import long_dialogue
    from MediRoundCore.model.tokenizer import train_tiny_tokenizer

    corpus = []
    for s in range(seed, seed + 4):
        sample = long_dialogue(s, n_rounds=20)
        corpus += sample.queries + sample.answers
    return train_tiny_tokenizer(corpus, vocab_size=2000)


# -- measurement ----------------------------------------------------------------------------------------------
def measure(engine, volume, queries, refs, runs: int, warmup: int, later: int, growth_rounds: int = 0) -> dict:
    """First Ask / later rounds (and optionally cost growth) with `engine`; peak GPU memory when on CUDA."""
    from bench_cpu import bench_asks, bench_growth, growth_ratios

    cuda = engine.model.device.type == "cuda"
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    weights = torch.cuda.memory_allocated() if cuda else None
    asks = bench_asks(engine, volume, queries, refs, runs, warmup, later)
    peak_asks = torch.cuda.max_memory_allocated() if cuda else None
    growth = ratios = None
    if growth_rounds:
        growth = bench_growth(engine, volume, queries[:growth_rounds], refs[:growth_rounds], 1)
        ratios = growth_ratios(growth)
    if cuda and engine.model.device.type != "cuda":
        raise RuntimeError("the engine moved the model to the CPU after a device fault (see MediRoundCore/device.py); "
                           "these are not GPU figures")
    return {"asks": asks, "growth": growth, "ratios": ratios, "weights_bytes": weights, "peak_bytes": peak_asks,
            "peak_bytes_growth": torch.cuda.max_memory_allocated() if cuda else None}


def _gb(x) -> str:
    return "–" if x is None else f"{x / GB:.2f} GB ({x / 2**30:.2f} GiB)"


def render_section(info: dict, computed: dict, args, measured: dict | None, device_note: str,
                   tokenizer_note: str = "", source: str = "", notes: list[str] | None = None) -> str:
    """The GPU section. `measured` maps "bf16"/"4-bit" to `measure` results (or an error string); None: no GPU."""
    L = ["## GPU\n"]
    c = computed
    if measured is None:
        L.append(f"**No GPU was lent to this project's session** ({device_note}): the measured GPU figures "
                 "(latency, peak GPU memory) are **pending**. Run `python benchmarks/bench_gpu.py` on a machine "
                 "with a CUDA GPU (and bitsandbytes for 4-bit); it replaces this section.\n")
        L.append(f"- Written by: `{info['command']}` ({info['date']}, git {info['git']}).\n")
    else:
        L.append(f"- GPU: {device_note}; torch {info['torch']} (CUDA {torch.version.cuda}), Python {info['python']}, "
                 f"CPU {info['cpu']}.")
        L.append(f"- Command: `{info['command']}` ({info['date']}, git {info['git']}).")
        L.append(f"- Model: `full_config()` with random weights, built directly on the GPU in bf16. {tokenizer_note}")
        L.append(f"- Slice: {args.size}×{args.size}, {source}; times are wall clock around `extract_slice` + "
                 f"`Engine.ask` (which returns after the mask is on the CPU). {args.runs} timed runs after "
                 f"{args.warmup} warm-up run(s); each: a fresh slice cache, round 1 (first Ask), rounds "
                 f"2–{1 + args.later} (later rounds).")
        L.append(f"- Random weights never choose to stop: every answer is decoded to {args.answer_tokens} tokens (the "
                 "answer-length limit is set to it; a special token can end one earlier), then closed with `[SEG]`. "
                 "The time per answer token gives the latency at any other length. The encoders, the mask decoder "
                 "and each language-model forward are synchronised with the GPU, so each part's time is its own.")
        L += [f"- {note}" for note in notes or []]
        L.append("")

    L.append("### Computed from the model (built on the `meta` device; nothing measured on a GPU)\n")
    rows = [[name, f"{n:,}", f"{n * 2 / GB:.3f}"] for name, n in c["parts"].items()]
    rows.append(["**total**", f"**{c['total']:,}**", f"**{c['bf16_bytes'] / GB:.2f}**"])
    L.append(table(["part", "parameters", "bf16 weights (GB, computed)"], rows))
    L.append(f"\n- bf16 weight memory, computed: {c['total']:,} parameters × 2 bytes = {_gb(c['bf16_bytes'])} "
             f"(buffers add {c['buffer_bytes'] / 1024:.0f} KiB).")
    L.append(f"- 4-bit weight memory, computed estimate: the decoder's Linear weights ({c['quantised_weights']:,}) in "
             f"NF4 with double-quantised statistics (≈ 0.516 byte each), the rest in bf16: {_gb(c['nf4_bytes'])}.")
    L.append(f"- KV cache, computed: {c['kv_bytes_per_token'] / 1024:.0f} KiB per token in bf16; the image prefix "
             f"({c['num_image_tokens']} image tokens) {c['kv_bytes_per_token'] * c['num_image_tokens'] / 2**20:.0f} MiB, "
             f"2,000 tokens (about a 20-round dialogue) {c['kv_bytes_per_token'] * 2000 / 2**20:.0f} MiB.\n")

    L.append("### Targets\n")
    trows = []
    for precision, limit in (("bf16", TARGET_BF16_GB), ("4-bit", TARGET_4BIT_GB)):
        m = (measured or {}).get(precision)
        computed_w = c["bf16_bytes"] if precision == "bf16" else c["nf4_bytes"]
        if isinstance(m, dict):
            later = summary([r["wall_ms"] for r in m["asks"]["later"]])["median"]
            peak = m["peak_bytes"]
            trows.append([f"later rounds, {precision} (median, {args.answer_tokens}-token answers)",
                          f"≤ {TARGET_LATER_MS:.0f} ms", f"{fmt(later)} ms", verdict(later <= TARGET_LATER_MS)])
            trows.append([f"peak GPU memory, {precision}", f"≤ {limit:g} GB", "–" if peak is None else
                          f"{peak / GB:.2f} GB", "–" if peak is None else verdict(peak <= limit * GB)])
        else:
            why = m if isinstance(m, str) else "pending (no GPU)"
            trows.append([f"later rounds, {precision}", f"≤ {TARGET_LATER_MS:.0f} ms", why, "–"])
            trows.append([f"peak GPU memory, {precision}", f"≤ {limit:g} GB",
                          f"{why}; weights alone, computed: {computed_w / GB:.2f} GB", "–"])
    L.append(table(["what", "target", "measured", ""], trows))
    L.append("")

    for precision in ("bf16", "4-bit"):
        m = (measured or {}).get(precision)
        if not isinstance(m, dict):
            continue
        first, later = m["asks"]["first"], m["asks"]["later"]
        L.append(f"### Measured, {precision}\n")
        s1, s2 = summary([r["wall_ms"] for r in first]), summary([r["wall_ms"] for r in later])
        med = lambda recs, key: summary([r[key] for r in recs if r[key] == r[key]])["median"]  # noqa: E731
        L.append(table(["", "first Ask", "later rounds"], [
            ["runs (timed)", str(s1["n"]), str(s2["n"])],
            ["latency median (ms)", fmt(s1["median"]), fmt(s2["median"])],
            ["latency min – max (ms)", f"{fmt(s1['min'])} – {fmt(s1['max'])}", f"{fmt(s2['min'])} – {fmt(s2['max'])}"],
            ["answer tokens, median", fmt(med(first, "answer_tokens")), fmt(med(later, "answer_tokens"))],
            ["time per answer token, median (ms)", fmt(med(first, "decode_ms_per_token"), 2),
             fmt(med(later, "decode_ms_per_token"), 2)],
            ["latency without answer decoding, median (ms)",
             fmt(summary([r["wall_ms"] - r["decode_ms"] for r in first])["median"]),
             fmt(summary([r["wall_ms"] - r["decode_ms"] for r in later])["median"])],
            ["segmenter encoder (ms)", fmt(med(first, "segmenter_encoder_ms")), "–"],
            ["vision tower (ms)", fmt(med(first, "vision_tower_ms")), "–"],
            ["image prefix forward (ms)", fmt(med(first, "prefix_ms")), "–"],
            ["language model: query + answer (ms)", fmt(med(first, "language_model_ms")),
             fmt(med(later, "language_model_ms"))],
            ["mask decoder (ms)", fmt(med(first, "mask_decoder_ms")), fmt(med(later, "mask_decoder_ms"))],
            ["other: reference crop/box features (ms)", fmt(med(first, "other_engine_ms")),
             fmt(med(later, "other_engine_ms"))],
        ]))
        per = med(later, "decode_ms_per_token")
        rest = summary([r["wall_ms"] - r["decode_ms"] for r in later])["median"]
        if per == per and per > 0:
            allowed = int((TARGET_LATER_MS - rest) // per) if rest < TARGET_LATER_MS else 0
            L.append(f"\nLater rounds at this speed: {rest:.0f} ms + {per:.1f} ms per answer token; the "
                     f"{TARGET_LATER_MS:.0f} ms target allows {allowed} answer token(s)."
                     + ("" if allowed else " The per-round work without decoding already exceeds it."))
        w = m["weights_bytes"]
        L.append(f"\nGPU memory, measured: weights and buffers {_gb(w)}; peak during the Ask runs "
                 f"{_gb(m['peak_bytes'])} (`torch.cuda.max_memory_allocated`, reset after building"
                 + (", after quantising" if precision == "4-bit" else "") + ").")
        if m.get("growth"):
            g, r = m["growth"]["rows"], m["ratios"]
            last = g["ours"][-1]["round"]
            L.append(f"\nCost growth on the GPU (one pass over {last} rounds): round {last} / round 2 latency, ours "
                     f"{fmt(r['ours']['wall_ms'], 2)}, naive re-run {fmt(r['naive']['wall_ms'], 2)}; prompt-side tokens "
                     f"ours {g['ours'][1]['prompt_tokens']} → {g['ours'][-1]['prompt_tokens']}, naive "
                     f"{g['naive'][1]['prompt_tokens']} → {g['naive'][-1]['prompt_tokens']}; round {last} latency "
                     f"ours {fmt(g['ours'][-1]['wall_ms'])} ms, naive {fmt(g['naive'][-1]['wall_ms'])} ms. Peak GPU "
                     f"memory including it: {_gb(m['peak_bytes_growth'])}.")
        L.append("")
    for precision in ("bf16", "4-bit"):
        m = (measured or {}).get(precision)
        if isinstance(m, str):
            L.append(f"- {precision}: {m}")
    return "\n".join(L).rstrip() + "\n"


# -- main -----------------------------------------------------------------------------------------------------
def run(argv=None) -> dict:
    args = parse_args(argv)
    out = Path(args.out)
    info = machine_info()
    info["command"] = command_line()
    say = lambda text: print(text, file=sys.stderr, flush=True)  # noqa: E731
    t = time.perf_counter()
    meta_model = build_full("meta", placeholder_ids())
    computed = computed_figures(meta_model)
    del meta_model
    say(f"bench_gpu: full model on meta: {computed['total']:,} parameters, bf16 weights "
        f"{computed['bf16_bytes'] / GB:.2f} GB computed ({time.perf_counter() - t:.1f} s)")
    if not torch.cuda.is_available():
        note = f"CUDA is not available here: {info['cpu']}, torch {info['torch']}"
        section = render_section(info, computed, args, None, note)
        path = write_section(out / "RESULTS.md", "gpu", section)
        say(f"bench_gpu: no GPU; wrote the pending GPU section with the computed figures to {path}")
        return {"computed": computed, "measured": None, "results": path}

    from bench_cpu import dialogue_and_volume

    from MediRoundCore.engine import Engine
    from MediRoundCore.model.tokenizer import TokenIds, load_tokenizer

    if args.tokenizer:
        tokenizer = load_tokenizer(args.tokenizer)
        tokenizer_note = f"Tokenizer: `{args.tokenizer}` with our four tokens added."
    else:
        tokenizer = stand_in_tokenizer(args.seed)
        tokenizer_note = ("Tokenizer: a stand-in byte-level BPE trained on generated dialogues (the Mistral tokenizer "
                          "is not on the machine; `--tokenizer DIR` uses it); query token counts differ somewhat.")
    queries, refs, volume, source = dialogue_and_volume(args.seed, max(args.growth_rounds, 1 + args.later, 2),
                                                        args.size)
    device_note = torch.cuda.get_device_name(0)
    measured: dict = {}
    t = time.perf_counter()
    model = build_full("cuda", TokenIds.from_tokenizer(tokenizer))
    model.config.max_answer_tokens = args.answer_tokens
    workaround = bf16_prompt_encoder_workaround(model)
    synchronize_parts(model)
    engine = Engine(model, tokenizer)
    say(f"bench_gpu: built on {device_note} in {time.perf_counter() - t:.1f} s; bf16 runs")
    measured["bf16"] = measure(engine, volume, queries, refs, args.runs, args.warmup, args.later, args.growth_rounds)
    if args.no_4bit:
        measured["4-bit"] = "not measured (`--no-4bit`)"
    else:
        try:
            import bitsandbytes  # noqa: F401
        except ImportError:
            measured["4-bit"] = "not measured: bitsandbytes is not installed"
        else:
            try:
                engine.forget()
                n = quantize_4bit(model)
                say(f"bench_gpu: {n} Linear layers in NF4; 4-bit runs")
                engine = Engine(model, tokenizer)
                measured["4-bit"] = measure(engine, volume, queries, refs, args.runs, args.warmup, args.later)
            except Exception as exc:  # report, do not lose the bf16 figures
                measured["4-bit"] = f"4-bit measurement failed: {type(exc).__name__}: {exc}"
    notes = [f"Workaround: {workaround}"] if workaround else []
    section = render_section(info, computed, args, measured, device_note, tokenizer_note, source, notes)
    path = write_section(out / "RESULTS.md", "gpu", section)
    say(f"bench_gpu: wrote {path}")
    return {"computed": computed, "measured": measured, "results": path}


def main(argv=None) -> int:
    run(argv)
    return 0


if __name__ == "__main__":
    sys.exit(main())
