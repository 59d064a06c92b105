"""Evaluation (issue 11): metric definitions vs medpy, the multi-round protocol (predicted masks feed later
rounds, ablations), the oracle path, and `mediround eval` writing QUALITY.md on a tiny generated split."""

import math

import numpy as np
import pytest
import torch
from medpy.metric.binary import dc, jc

from MediRoundCore.engine import Engine
from MediRoundCore.evaluate import metrics
from MediRoundCore.evaluate.protocol import (CONFIGS, DEFAULT_CONFIGS, EvalEngine, OracleEngine, config_reference,
                                             evaluate_dialogue, evaluate_sample, is_ambiguous, parse_configs,
                                             sample_image)
from MediRoundCore.evaluate import run as eval_run
from MediRoundCore.model.processing import reference_inputs
from conftest import needs_shipped_model


@pytest.fixture(autouse=True)
def _restore_threads():
    """`mediround eval --threads` sets torch's global thread count; give the other tests theirs back."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def split_dir(tmp_path_factory):
    from MediRoundCore.data.splits import build_split

    folder = tmp_path_factory.mktemp("regular")
    build_split("regular", folder, 3, seed=0)
    return folder


@pytest.fixture(scope="module")
def samples(split_dir):
    from MediRoundCore.data.dataset import MRMedSegDataset

    ds = MRMedSegDataset(split_dir)
    return [ds[i] for i in range(len(ds))]


@pytest.fixture
def fast_engine(tiny_engine, monkeypatch):
    """The random tiny engine as an EvalEngine, answers capped at 3 tokens, one thread (the CPU is shared)."""
    monkeypatch.setattr(tiny_engine.model.config, "max_answer_tokens", 3)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield EvalEngine.from_engine(tiny_engine)
    torch.set_num_threads(threads)


# -- metrics ------------------------------------------------------------------------------------------------
def _mask_pairs():
    rng = np.random.default_rng(0)
    pairs = [(rng.random((40, 50)) < p, rng.random((40, 50)) < q) for p, q in [(0.3, 0.3), (0.05, 0.6), (0.9, 0.1)]]
    g = np.zeros((40, 50), bool)
    g[10:20, 10:30] = True
    pairs += [(g, g), (np.roll(g, 5, axis=1), g), (np.zeros_like(g), g), (g, np.zeros_like(g)), (~g, g)]
    return pairs


def test_metrics_match_medpy():
    pairs = _mask_pairs()
    for pred, gt in pairs:
        assert metrics.dice(pred, gt) == pytest.approx(dc(pred, gt), abs=1e-12)
        assert metrics.iou(pred, gt) == pytest.approx(jc(pred, gt), abs=1e-12)
    scores = metrics.summarize(metrics.mask_counts(p, g) for p, g in pairs)
    assert scores.n == len(pairs)
    assert scores.dice == pytest.approx(100 * np.mean([dc(p, g) for p, g in pairs]))
    assert scores.giou == pytest.approx(100 * np.mean([jc(p, g) for p, g in pairs]))
    inter = sum(np.logical_and(p, g).sum() for p, g in pairs)
    union = sum(np.logical_or(p, g).sum() for p, g in pairs)
    assert scores.ciou == pytest.approx(100 * inter / union)
    # cIoU weighs large masks more: it differs from gIoU here
    assert abs(scores.ciou - scores.giou) > 1


def test_metric_conventions():
    empty = np.zeros((8, 8), bool)
    full = np.ones((8, 8), bool)
    # empty vs empty: perfect, and adds nothing to the cIoU sums (medpy means 1 too, but its numpy division
    # gives NaN with a warning instead of the ZeroDivisionError its code catches)
    assert metrics.dice(empty, empty) == 1.0 and metrics.iou(empty, empty) == 1.0
    with np.errstate(invalid="ignore"):
        assert dc(empty, empty) in (1.0,) or math.isnan(dc(empty, empty))
    assert metrics.dice(empty, full) == 0.0 and metrics.iou(full, empty) == 0.0
    s = metrics.summarize([metrics.mask_counts(empty, empty), metrics.mask_counts(full, full)])
    assert (s.dice, s.giou, s.ciou) == (100.0, 100.0, 100.0)
    s = metrics.summarize([metrics.mask_counts(empty, empty), metrics.mask_counts(empty, full)])
    assert (s.dice, s.giou, s.ciou) == (50.0, 50.0, 0.0)
    assert metrics.summarize([metrics.mask_counts(empty, empty)]).ciou == 100.0
    nothing = metrics.summarize([])
    assert nothing.n == 0 and math.isnan(nothing.dice)
    with pytest.raises(ValueError):
        metrics.mask_counts(empty, np.zeros((8, 9), bool))


def test_bootstrap_interval_is_paired_over_dialogues():
    from MediRoundCore.evaluate.protocol import RoundRecord
    from MediRoundCore.evaluate.report import bootstrap_ci

    rng = np.random.default_rng(1)
    records = []
    for d in range(30):
        for k in range(1, 5):
            inter = int(rng.integers(0, 50))
            for config, extra in (("a", 10), ("b", 0)):  # a is always 10 pixels better, paired
                c = metrics.MaskCounts(inter + extra, 100, inter + extra + 20, 80)
                records.append(RoundRecord(config, str(d), k, c, None, None, None, None, None, None, False, False, 0.0))
    diffs = [ra.counts.dice - rb.counts.dice for ra, rb in zip(records[::2], records[1::2])]
    lo, hi = bootstrap_ci(records, "a", "b")
    assert lo <= 100 * np.mean(diffs) <= hi and hi - lo < 1.0  # paired: the spread of Dice itself cancels
    lo_a, hi_a = bootstrap_ci(records, "a")
    assert hi_a - lo_a > hi - lo
    assert all(math.isnan(x) for x in bootstrap_ci(records, "a", "missing"))


def test_size_and_judgment_tables_bin_the_records():
    from MediRoundCore.evaluate.protocol import RoundRecord
    from MediRoundCore.evaluate.report import jcm_judgment_table, size_table

    def rec(config, gt_area, inter, score):
        pred = gt_area  # Dice = inter / gt_area
        counts = metrics.MaskCounts(inter, gt_area + pred - inter, pred, gt_area)
        corrected = score is not None and score <= 0.6
        return RoundRecord(config, "0", 1, counts, None, None, None, None, None, score, corrected, False, 0.0)

    # small targets badly segmented and judged low; large ones well segmented and judged high
    records = [rec("ind+jcm", 40, 10, 0.3), rec("ind+jcm", 40, 20, 0.4), rec("ind+jcm", 2000, 1900, 0.95),
               rec("ind+jcm", 0, 0, 0.8), rec("ind-nojcm", 300, 150, None)]
    sizes = size_table(records, ["ind+jcm", "ind-nojcm"])
    row = next(line for line in sizes if line.startswith("| ind+jcm"))
    cells = [c.strip() for c in row.strip("|").split("|")][1:]
    assert cells == ["100.0 (1)", "37.5 (2)", "–", "–", "95.0 (1)"]  # empty, <64, 64–256, 256–1024, ≥1024
    nojcm_row = next(line for line in sizes if line.startswith("| ind-nojcm"))
    nojcm = [c.strip() for c in nojcm_row.strip("|").split("|")][1:]
    assert nojcm == ["–", "–", "–", "50.0 (1)", "–"]

    judged = jcm_judgment_table(records, ["ind+jcm", "ind-nojcm"])
    rows = [line for line in judged if line.startswith("| ind")]
    assert len(rows) == 1  # only the config with scores
    cells = [c.strip() for c in rows[0].strip("|").split("|")]
    assert float(cells[1]) > 0.8  # scores rank the masks
    assert cells[2:7] == ["37.5 (2)", "–", "100.0 (1)", "95.0 (1)", "50.0 %"]
    assert jcm_judgment_table([r for r in records if r.config == "ind-nojcm"], ["ind-nojcm"]) == []


# -- protocol -----------------------------------------------------------------------------------------------
def test_configs_and_references(samples):
    assert [c.name for c in parse_configs(["ind+jcm,noref", "prevround", "noref"])] == ["ind+jcm", "noref", "prevround"]
    with pytest.raises(ValueError):
        parse_configs(["ind+jcm,bogus"])
    s = samples[0]
    for k in range(s.num_rounds):
        ind = s.ref_indices[k]
        assert config_reference(CONFIGS["ind+jcm"], s, k) == (None if ind is None else ind + 1)
        assert config_reference(CONFIGS["resolver+jcm"], s, k) is None
        assert config_reference(CONFIGS["prevround"], s, k) == (k if k else None)


def test_ambiguity_from_generator_metadata(samples):
    from MediRoundCore.data.splits import make_dialogue

    for i, s in enumerate(samples):
        dlg = make_dialogue("regular", 0, i)  # the same dialogue, regenerated
        for k, r in enumerate(dlg.rounds):
            assert is_ambiguous(s, k) == (r.ref is not None and r.distractors > 0)
        assert is_ambiguous(s, 0) is False
    s = samples[0]
    bare = type(s)(**{**s.__dict__, "meta": {}})
    assert is_ambiguous(bare, 1) is None


def test_sample_image_is_identity(samples):
    image = sample_image(samples[0])
    assert np.array_equal(image.normalized(), samples[0].image)


def test_oracle_scores_100_in_every_config(samples):
    oracle = OracleEngine()
    for i, s in enumerate(samples):
        runs = evaluate_sample(oracle, s, [CONFIGS[c] for c in CONFIGS], str(i))
        for run in runs:
            assert [r.round for r in run.records] == list(range(1, s.num_rounds + 1))
            assert all(r.counts.dice == 1.0 and r.counts.iou == 1.0 and r.entity_ok for r in run.records)
            if run.config.reference == "dataset":
                assert [r.reference for r in run.records] == [r.gt_reference for r in run.records]
    assert not oracle._truth  # per-dialogue state is dropped


def test_predicted_masks_feed_later_rounds(fast_engine, samples):
    """Round 1's PREDICTED mask (here forced empty) is what round 2's reference features are built from."""
    sample = next(s for s in samples if s.ref_indices[1] == 0)
    seen = []

    class EmptyFirstRound(EvalEngine):
        def ask(self, session, *args, **kwargs):
            result = super().ask(session, *args, **kwargs)
            if result.round.number == 1:
                result.round.mask = np.zeros_like(result.round.mask)
            return result

        def _reference_features(self, session, reference, state, image):
            feats = super()._reference_features(session, reference, state, image)
            seen.append((reference, session.round(reference).mask.copy(), feats))
            return feats

    engine = EmptyFirstRound.from_engine(fast_engine)
    run = evaluate_sample(engine, sample, [CONFIGS["ind+jcm"]], keep_sessions=True)[0]
    assert not run.session.rounds[0].mask.any() and sample.masks[0].any()
    assert run.records[0].counts.pred_area == 0  # scored as predicted
    reference, mask, (crop, box) = seen[0]
    assert reference == 1 and not mask.any()
    blank_crop, blank_box = reference_inputs(sample.image, mask, engine.model.config)
    with torch.inference_mode():
        assert torch.allclose(box, engine.model.encode_boxes(blank_box[None]))
        assert torch.allclose(crop, engine.model.encode_crops(blank_crop[None]))
        _, gt_box = reference_inputs(sample.image, sample.masks[0], engine.model.config)
        assert not torch.allclose(box, engine.model.encode_boxes(gt_box[None]))
    # later rounds that refer to round 1 see the same stored (empty) mask
    assert all(not m.any() for ref, m, _ in seen if ref == 1)


class _Spy:
    """Records the RoundResults of a predictor."""

    def __init__(self, engine):
        self.engine, self.results = engine, []

    def mode(self, config):
        return self.engine.mode(config)

    def ask(self, *args, **kwargs):
        result = self.engine.ask(*args, **kwargs)
        self.results.append(result)
        return result


def test_ablations_change_only_what_they_remove(fast_engine, samples):
    sample = max(samples, key=lambda s: s.num_rounds)
    out = {}
    for name in ("ind+jcm", "ind-nojcm", "noref", "nohistory", "prevround", "resolver+jcm"):
        spy = _Spy(fast_engine)
        out[name] = (evaluate_dialogue(spy, sample, CONFIGS[name]), spy.results)
    base_run, base = out["ind+jcm"]
    # round 1 has no reference and no history: identical everywhere (caches are per session, not leaked)
    for name, (run, results) in out.items():
        assert torch.allclose(results[0].raw_prompt, base[0].raw_prompt, atol=1e-5), name
    # JCM off decodes the raw prompt; JCM on reports a score
    assert all(r.jcm_score is None for r in out["ind-nojcm"][0].records)
    assert all(r.jcm_score is not None for r in base_run.records)
    # no reference: a blank crop and box instead of the referenced mask's
    blank = fast_engine._blank
    assert blank is not None
    with torch.inference_mode():
        crop, box = reference_inputs(np.zeros((8, 8), np.float32), np.zeros((8, 8), bool), fast_engine.model.config)
        assert torch.allclose(blank[1], fast_engine.model.encode_boxes(box[None]))
    assert any(not torch.allclose(a.raw_prompt, b.raw_prompt, atol=1e-6) for a, b in zip(out["noref"][1][1:], base[1:]))
    # no history: every round is prefix + its own query (as a first turn), reference mask kept
    prefix = len(fast_engine.builder.prefix())
    for k, (query, result) in enumerate(zip(sample.queries, out["nohistory"][1])):
        ref = sample.ref_indices[k] is not None
        assert result.forward_tokens[:2] == [prefix, len(fast_engine.builder.user(" ".join(query.split()), ref, True))]
        assert result.round.reference == (None if not ref else sample.ref_indices[k] + 1)
    # prevround always refers to round t-1
    assert [r.reference for r in out["prevround"][0].records] == [None] + list(range(1, sample.num_rounds))
    # the engine's per-session stores are emptied after each dialogue
    fast_engine.end_dialogue([run.session for run, _ in out.values()])
    assert len(fast_engine._memory) == 0


def test_rebuilt_prefix_starts_at_position_zero(fast_engine, samples):
    """Each new session rebuilds the slice's cache; positions restart at 0 (they match the cached tokens)."""
    evaluate_sample(fast_engine, samples[0], [CONFIGS["ind+jcm"], CONFIGS["nohistory"], CONFIGS["ind+jcm"]])
    state = next(iter(fast_engine._slices.values()))
    assert state.cache_len == state.cache.get_seq_length()


# -- runner -------------------------------------------------------------------------------------------------
SECTIONS = ("## Run", "## Data", "## Configurations", "## Overall", "## Per-round Dice", "## Per-round cIoU",
            "## Ablations and variants", "## Targets", "## Files")


def test_eval_cli_oracle(split_dir, tmp_path, capsys):
    out = tmp_path / "out"
    assert eval_run.main(["--oracle", "--data", str(split_dir), "--limit", "0", "--out", str(out), "--quiet",
                          "--threads", "1", "--records", "--no-plot"]) == 0
    text = (out / "QUALITY.md").read_text()
    assert all(s in text for s in SECTIONS)
    assert "| ind+jcm |" in text and "| 100.0 | 100.0 | 100.0 |" in text
    assert "overall Dice ≥ 85 with dataset references (ind+jcm) | 100.0 (95 % CI 100.0–100.0, n=" in text
    assert "| **PASS** |" in text
    assert "| **FAIL** |" in text  # JCM gains nothing on the ground truth
    import csv

    rows = list(csv.DictReader(open(out / "quality.csv")))
    assert {r["config"] for r in rows} == set(DEFAULT_CONFIGS)
    assert all(float(r["dice"]) == 100.0 for r in rows if r["n"] != "0")
    records = list(csv.DictReader(open(out / "quality_records.csv")))
    assert len(records) == len(DEFAULT_CONFIGS) * int(next(r["n"] for r in rows if r["scope"] == "overall"))
    named = [r for r in records if r["entity_ok"] == "True"]  # the answer's entity is kept with each round
    assert named and all(r["entity"] for r in named) and {r["reference_tries"] for r in records} == {"1"}


def test_eval_cli_random_engine_all_configs(split_dir, fast_engine, tmp_path, monkeypatch):
    monkeypatch.setattr(Engine, "random_tiny", classmethod(lambda cls, seed=0, **kw: fast_engine))
    out = tmp_path / "q"
    argv = ["--random", "--data", str(split_dir), "--limit", "2", "--configs", ",".join(CONFIGS), "--out", str(out),
            "--quiet", "--threads", "1"]
    assert eval_run.main(argv) == 0
    text = (out / "QUALITY.md").read_text()
    assert all(s in text for s in SECTIONS)
    assert "mediround eval " + " ".join(argv) in text
    assert all(f"| {c} |" in text for c in CONFIGS)
    assert text.count("**PASS**") + text.count("**FAIL**") == 3
    assert "torch threads 1" in text and "CPU " in text
    assert (out / "quality_rounds.png").stat().st_size > 1000


def test_ensure_split_builds_once(tmp_path, monkeypatch):
    calls = []
    import MediRoundCore.data.splits as splits

    real = splits.build_split
    monkeypatch.setattr(splits, "build_split", lambda *a, **k: calls.append(a) or real(*a, **k))
    quiet = lambda *a, **k: None  # noqa: E731
    first = eval_run.ensure_split("regular", 0, 2, tmp_path, quiet)
    again = eval_run.ensure_split("regular", 0, 1, tmp_path, quiet)
    assert first == again and len(calls) == 1
    eval_run.ensure_split("regular", 0, 3, tmp_path, quiet)
    assert len(calls) == 2 and (first / "count.txt").read_text().strip() == "3"
    assert not list(tmp_path.glob(".*tmp*"))


def test_eval_cli_errors(tmp_path):
    from MediRoundCore.errors import MediRoundError

    with pytest.raises(MediRoundError, match="unknown config"):
        eval_run.main(["--oracle", "--configs", "nope", "--data", str(tmp_path)])
    with pytest.raises(MediRoundError, match="no checkpoint"):
        eval_run.main(["--checkpoint", str(tmp_path / "missing"), "--data", str(tmp_path), "--quiet"])


def test_mediround_eval_command(split_dir, tmp_path):
    from MediRoundCore import cli

    out = tmp_path / "cli"
    # "--" keeps argparse's REMAINDER from rejecting a leading option (`mediround eval --oracle` needs cli.py's fix)
    assert cli.main(["eval", "--", "--oracle", "--data", str(split_dir), "--limit", "1", "--configs", "ind+jcm",
                     "--out", str(out), "--quiet", "--no-plot", "--threads", "1"]) == 0
    assert "| ind+jcm | " in (out / "QUALITY.md").read_text()


def test_beta_selection_refuses_a_threshold_outside_0_to_1(tmp_path, capsys):
    from MediRoundCore.evaluate.select_beta import main

    with pytest.raises(SystemExit) as info:
        main(["--betas", "0.6", "1.5", "--out", str(tmp_path / "b.md")])
    assert info.value.code == 2 and "must be a number from 0 to 1" in capsys.readouterr().err
    assert not (tmp_path / "b.md").exists()


@needs_shipped_model
def test_beta_selection_writes_each_threshold_once_in_order(tmp_path):
    from MediRoundCore.evaluate.select_beta import main

    out = tmp_path / "beta.md"
    assert main(["--limit", "2", "--threads", "1", "--betas", "1", "0.5", "1", "--out", str(out)]) == 0
    rows = [line.split(" | ")[0].strip("| ") for line in out.read_text().splitlines() if line.startswith("| ")]
    assert [r.split(" ")[0] for r in rows] == ["β", "JCM", "0.5", "1"]  # each once, in order
    assert sum("(chosen)" in r for r in rows) == 1


@needs_shipped_model
def test_beta_sweep_scores_each_threshold_and_picks_the_best(samples):
    from MediRoundCore.evaluate.select_beta import sweep

    torch.set_num_threads(1)
    shipped = EvalEngine.from_engine(Engine.load())
    ids = [str(i) for i in range(len(samples))]
    best, rows = sweep(shipped, samples, ids, betas=(0.0, 1.0))
    off, never, always = rows["off"], rows[0.0], rows[1.0]
    assert (never.dice, never.ciou) == (off.dice, off.ciou)  # a sigmoid score is never ≤ 0: nothing corrected
    assert (always.dice, always.ciou) != (off.dice, off.ciou)  # every [SEG] embedding is corrected
    assert best == max((0.0, 1.0), key=lambda b: (round(rows[b].dice, 2), b))


def test_the_evaluator_keeps_the_engine_s_answer_rules(tiny_engine):
    """The evaluator measures the engine a user gets: a rule switched off on the engine is off in its copy."""
    assert EvalEngine.from_engine(tiny_engine).one_lesion_by_size and tiny_engine.one_lesion_by_size
    rules = tiny_engine.new_structure_guesses, tiny_engine.one_lesion_by_size
    tiny_engine.new_structure_guesses = tiny_engine.one_lesion_by_size = False
    try:
        copy = EvalEngine.from_engine(tiny_engine)
        assert not copy.new_structure_guesses and not copy.one_lesion_by_size
    finally:
        tiny_engine.new_structure_guesses, tiny_engine.one_lesion_by_size = rules
