"""Dialogues and splits: references, answers, templates, split parameters, samples, demo files."""

import json
import re

import numpy as np
import pytest
import SimpleITK as sitk

from MediRoundCore.answers import format_answer, parse_entity
from MediRoundCore.data.anatomy import generate_slice
from MediRoundCore.data.dataset import MRMedSegDataset
from MediRoundCore.data.demo import bundled_demo_paths, read_label_names
from MediRoundCore.data.dialogues import DialoguePolicy, generate_dialogue
from MediRoundCore.data.mrmedseg import read_conversations, write_conversations
from MediRoundCore.data.splits import (SPLITS, build_split, iter_training_samples, long_dialogue, make_dialogue,
                                       split_statistics, to_sample)
from MediRoundCore.data.templates import RELATIONS, TEMPLATES, is_reserved, template_regex


@pytest.fixture(scope="module")
def hard_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("hard")
    build_split("hard", out, 30, seed=1)
    return out


@pytest.fixture(scope="module")
def train_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("train")
    build_split("train", out, 30, seed=1)
    return out


def test_template_pools():
    for relation in ("direct", *RELATIONS):
        assert len(TEMPLATES[relation]) >= 20
        assert len(set(TEMPLATES[relation])) == len(TEMPLATES[relation])
        assert sum(is_reserved(i) for i in range(len(TEMPLATES[relation]))) == len(TEMPLATES[relation]) // 5


def test_dialogue_deterministic_and_consistent():
    a, b = make_dialogue("hard", 0, 4), make_dialogue("hard", 0, 4)
    assert [r.query for r in a.rounds] == [r.query for r in b.rounds]
    assert np.array_equal(a.masks(), b.masks())
    assert [r.query for r in make_dialogue("hard", 1, 4).rounds] != [r.query for r in a.rounds]


def test_generated_rounds_are_well_formed(hard_dir):
    for sample in MRMedSegDataset(hard_dir):
        assert sample.ref_indices[0] is None
        for k, (ref, answer, entity) in enumerate(zip(sample.ref_indices, sample.answers, sample.entities)):
            if k:
                assert ref is not None and 0 <= ref < k  # every reference resolves to an earlier round
            assert answer.endswith("[SEG]") and parse_entity(answer) == entity
            rationale = answer.split(":", 1)[1].replace("[SEG]", "").strip()
            assert answer == format_answer(entity, rationale)
        assert len(set(sample.entities)) == len(sample.entities)  # unique entities
        assert all(m.any() for m in sample.masks)
        # not always the previous round
    refs = [(k, r) for s in MRMedSegDataset(hard_dir) for k, r in enumerate(s.ref_indices) if r is not None]
    assert any(k - r >= 2 for k, r in refs)


def test_lesion_rounds_lie_inside_the_referenced_mask(hard_dir):
    checked = 0
    for sample in MRMedSegDataset(hard_dir):
        for k, r in enumerate(sample.meta["rounds"]):
            if r["relation"] in ("lesion", "hierarchy"):
                ref = sample.ref_indices[k]
                assert not (sample.masks[k] & ~sample.masks[ref]).any()
                checked += 1
    assert checked > 5


def test_hard_split_parameters_hold(hard_dir):
    stats = split_statistics(hard_dir)
    assert stats["dialogues"] == 30
    assert 6 <= stats["rounds_min"] and stats["rounds_max"] <= 10
    assert stats["distractor_dialogue_share"] >= 0.5
    assert stats["lesion_or_part_distractor_share"] >= 0.5
    assert stats["reach_back_2plus_share"] >= 0.3
    assert stats["noise_range"][0] < 0.15 and stats["noise_range"][1] > 0.85
    assert stats["contrast_range"][0] < 0.65 and stats["contrast_range"][1] > 1.35
    assert set(stats["relations"]) == {"direct", *RELATIONS}
    assert stats["reserved_templates_used"] > 0
    assert set(stats["regions"]) == {"abdomen", "chest", "brain"}


def test_regular_split_is_short(tmp_path):
    build_split("regular", tmp_path, 12, seed=2)
    stats = split_statistics(tmp_path)
    assert 2 <= stats["rounds_min"] and stats["rounds_max"] <= 5
    assert 0.1 <= stats["noise_range"][0] and stats["noise_range"][1] <= 0.4


def test_reserved_templates_never_in_train(train_dir):
    reserved = {rel: [template_regex(rel, i) for i in range(len(TEMPLATES[rel])) if is_reserved(i)]
                for rel in TEMPLATES}
    stats = split_statistics(train_dir)
    assert stats["reserved_templates_used"] == 0
    for conv in read_conversations(next(train_dir.glob("*.json")), train_dir):
        for rnd, meta in zip(conv.rounds, conv.extra["meta"]["rounds"]):
            assert template_regex(meta["relation"], meta["template"]).match(rnd.query)  # meta is truthful
            assert not is_reserved(meta["template"])
            assert not any(p.match(rnd.query) for p in reserved[meta["relation"]]), rnd.query
    for sample in iter_training_samples(seed=3, n=20):
        assert not any(is_reserved(r["template"]) for r in sample.meta["rounds"])


def test_seed_ranges_are_disjoint():
    bases = sorted(p.seed_base for p in SPLITS.values())
    assert all(b - a >= 1_000_000_000 for a, b in zip(bases, bases[1:]))
    seeds = {name: {make_dialogue(name, 0, i).slice.seed for i in range(3)} for name in SPLITS}
    assert not seeds["train"] & (seeds["val"] | seeds["regular"] | seeds["hard"])


def test_written_split_round_trips_and_matches_in_memory_samples(train_dir):
    path = next(train_dir.glob("*.json"))
    convs = read_conversations(path, train_dir)
    assert write_conversations(convs, train_dir / "copy.json.out").read_text() == path.read_text()
    written = MRMedSegDataset(train_dir, path)[2]
    memory = next(s for i, s in enumerate(iter_training_samples(seed=1, n=3)) if i == 2)
    assert np.array_equal(written.image, memory.image) and np.array_equal(written.masks, memory.masks)
    assert written.answers == memory.answers and written.ref_indices == memory.ref_indices
    assert written.queries == memory.queries and written.entities == memory.entities


def test_same_class_distractor_needs_the_reference():
    sl = generate_slice("abdomen", 21, paired=True, lesions={"left kidney": 1, "right kidney": 1, "liver": 0})
    d = generate_dialogue(sl, 4, [21], DialoguePolicy(p_distractor=1.0, p_first_inferential=0.0))
    sample = to_sample(d)
    lesion_rounds = [k for k, r in enumerate(d.rounds) if r.relation == "lesion"]
    for k in lesion_rounds:  # the query text alone fits two lesions; the referenced kidney decides
        assert d.rounds[k].distractors >= 1
        assert not (sample.masks[k] & ~sample.masks[sample.ref_indices[k]]).any()


def test_long_dialogue_on_one_slice():
    sample = long_dialogue(seed=0, n_rounds=20)
    assert len(sample.queries) == 20 and sample.masks.shape[0] == 20
    assert len(set(sample.entities)) == 20
    assert all(r is None if k == 0 else 0 <= r < k for k, r in enumerate(sample.ref_indices))


def test_bundled_demo_files():
    paths = bundled_demo_paths()
    assert paths["volume"].stat().st_size < 3 * 2 ** 20
    image = sitk.ReadImage(str(paths["volume"]))
    labels = sitk.ReadImage(str(paths["labels"]))
    assert image.GetPixelID() == sitk.sitkInt16 and image.GetSize() == (256, 256, 24)
    assert labels.GetSize() == image.GetSize() and labels.GetSpacing() == image.GetSpacing()
    names = read_label_names(labels)
    dialogue = json.loads(paths["dialogue"].read_text())
    assert 3 <= len(dialogue) <= 5 and any(r["refers_to"] is not None for r in dialogue[1:])
    arr = sitk.GetArrayViewFromImage(labels)
    for r in dialogue:
        assert names[r["expected_label"]] == r["expected_entity"]
        assert (arr[r["slice_index"]] == r["expected_label"]).sum() > 20
        assert re.search(r"\w", r["query"])
    # the left kidney is on the patient's left: larger physical x than the right kidney
    lk = [v for v, n in names.items() if n == "left kidney"][0]
    rk = [v for v, n in names.items() if n == "right kidney"][0]
    xs = []
    for v in (lk, rk):
        k, j, i = np.nonzero(arr == v)
        xs.append(labels.TransformContinuousIndexToPhysicalPoint((i.mean(), j.mean(), k.mean()))[0])
    assert xs[0] > xs[1]
