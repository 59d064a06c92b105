"""What a user sees from the shipped model (MediRoundCore/weights/mediround-lite): the demo dialogue's masks,
scored against the generator's labels, on the bundled volume and on copies of it that keep the anatomy —
re-oriented (axis permutations), flipped, cropped, non-square (tests/demo_variants.py, made with SimpleITK's own
filters). Same anatomy, same answer.

Each round is scored twice: on the displayed slice (the mask against the labels' same displayed slice) and in the
volume (the mask put back into the voxels, `mask_into_volume`, against the label volume), so a mask drawn right
but written back to the wrong voxels fails as well. Deterministic on CPU (greedy decoding, float32).
"""

from __future__ import annotations

import numpy as np
import pytest

from demo_variants import DEMO_VARIANTS, FLOORS, MEASURED, NOT_YET, demo_variant, dice, floors_of
from MediRoundCore.engine import Engine
from MediRoundCore.imaging import extract_slice, mask_into_volume
from MediRoundCore.session import Session

from conftest import needs_shipped_model  # noqa: E402

pytestmark = needs_shipped_model

SAME_ANSWER = 0.05  # per-round Dice of a variant within this of the original's


@pytest.fixture(scope="module")
def shipped():
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a busy shared CPU: one thread is faster here
    yield Engine.load(device="cpu")
    torch.set_num_threads(threads)


def _dialogue(engine, name):
    """Dice per round on the display and in the volume, and the session."""
    volume, labels, index, script = demo_variant(name)
    session = Session(volume.fingerprint())
    session.volume = volume
    image = extract_slice(volume, "axial", index)
    truth = extract_slice(labels, "axial", index).pixels
    shown, voxels = [], []
    for step in script:
        ref = None if step.get("refers_to") is None else step["refers_to"] + 1
        mask = engine.ask(session, step["query"], image, reference=ref).mask
        label = step["expected_label"]
        shown.append(dice(mask, truth == label))
        in_volume = mask_into_volume(volume, image, mask).astype(bool)
        plane = np.zeros_like(in_volume)
        plane[tuple(slice(None) if a != 2 - image.axis else index for a in range(3))] = True
        voxels.append(dice(in_volume, (labels.array == label) & plane))
    return shown, voxels, session


@pytest.fixture(scope="module")
def original(shipped):
    return _dialogue(shipped, "original")


def test_demo_dialogue_on_the_bundled_volume(original):
    shown, voxels, session = original
    assert [r.entity for r in session.rounds] == ["left kidney", "lesion in the left kidney", "gallbladder", "spleen"]
    assert [r.reference for r in session.rounds] == [None, 1, 2, 1]
    assert not any(r.seg_forced for r in session.rounds)  # the trained model ends each answer with [SEG] itself
    for n, (d, v, floor) in enumerate(zip(shown, voxels, FLOORS), start=1):
        assert d >= floor, f"round {n}: Dice {d:.3f} < {floor} (measured {MEASURED[n - 1]})"
        assert v == pytest.approx(d, abs=1e-9), f"round {n}: the mask went back to other voxels"


@pytest.mark.parametrize("name", [n for n in DEMO_VARIANTS if n != "original"])
def test_same_anatomy_same_answer(shipped, original, name):
    shown, voxels, session = _dialogue(shipped, name)
    assert [r.entity for r in session.rounds] == [r.entity for r in original[2].rounds]
    for n, (d, v, floor) in enumerate(zip(shown, voxels, floors_of(name)), start=1):
        assert d >= floor, f"{name} round {n}: Dice {d:.3f} < {floor}"
        assert v == pytest.approx(d, abs=1e-9), f"{name} round {n}: the mask went back to other voxels"
    difference = max(abs(d - d0) for d, d0 in zip(shown, original[0]))
    if name in NOT_YET:
        assert difference > SAME_ANSWER, (f"{name} is now answered within {SAME_ANSWER} of the original "
                                          f"({difference:.3f}): take it out of NOT_YET")
    else:
        assert difference <= SAME_ANSWER, f"{name}: Dice {[round(d, 3) for d in shown]}, original " \
                                          f"{[round(d, 3) for d in original[0]]}"


def test_the_variants_report_says_what_the_dialogues_measure(shipped, original):
    """`mediround eval --sets variants`: its table is the dialogues' Dice, and a kind passes only when every
    variant of that kind keeps every round within 0.05 of the original. One variant of each kind, the cut among
    them the tightest (the whole set: `test_same_anatomy_same_answer`)."""
    from MediRoundCore.evaluate.demo_variants import KINDS
    from MediRoundCore.evaluate.sets import TARGET_SAME_ANSWER, variants_set

    names = ["crop_176x256", "cut_136x144_tight", "flipped_k"]
    result = variants_set(shipped, names=names)
    assert len({KINDS[n] for n in names}) == len(set(KINDS.values())) - 1  # every kind but the original's
    rows = {line.split(" | ")[0].strip("| "): line.split(" | ") for line in result.lines if line.startswith("| ")}
    assert [float(x) for x in rows["original"][3:3 + len(original[0])]] == [round(d, 3) for d in original[0]]
    for target, measured, verdict in result.verdicts:
        kind = target.split(":")[0]
        diffs = [float(r[-1].strip(" |")) for name, r in rows.items() if len(r) > 2 and r[1] == kind]
        assert diffs and verdict == ("PASS" if max(diffs) <= TARGET_SAME_ANSWER else "MISS"), (target, diffs)
    for name, row in rows.items():  # the last column is the largest difference either way, not only a drop
        if name in DEMO_VARIANTS:
            dice_row = [float(x) for x in row[3:3 + len(original[0])]]
            expected = max(abs(a - b) for a, b in zip(dice_row, [round(d, 3) for d in original[0]]))
            assert float(row[-1].strip(" |")) == pytest.approx(expected, abs=1.5e-3), name


def test_a_session_refuses_a_moved_copy_of_its_volume(tmp_path, shipped):
    """A session saved on the demo volume does not open on a flipped or cropped copy (its masks would land on
    other voxels of the patient), and opens again on the volume itself."""
    volume, _, index, script = demo_variant("original")
    session = Session(volume.fingerprint(), tmp_path / "s", volume.name)
    session.volume = volume
    shipped.ask(session, script[0]["query"], extract_slice(volume, "axial", index))
    from MediRoundCore.cli import open_session
    from MediRoundCore.errors import SessionError

    from MediRoundCore.imaging import Volume

    for name in ("flipped_ij", "permuted_jik", "crop_176x256"):
        with pytest.raises(SessionError, match="another volume"):
            open_session(tmp_path / "s", demo_variant(name)[0])
    # the same voxels under another header: re-spaced, moved, re-oriented
    turned = np.array([[0.0, -1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])
    headers = [dict(spacing=(1.5, 1.5, 5.0)), dict(origin=(0.0, 0.0, 0.0)), dict(direction=turned)]
    for header in headers:
        geometry = dict(spacing=volume.spacing, origin=volume.origin, direction=volume.direction)
        geometry.update(header)
        copy = Volume(volume.array, name=volume.name, **geometry)
        assert np.array_equal(copy.array, volume.array)
        with pytest.raises(SessionError, match="another volume"):
            open_session(tmp_path / "s", copy)
    assert len(open_session(tmp_path / "s", volume).rounds) == 1


def test_the_model_sees_a_ct_slice_as_it_was_trained():
    """The demo's CT slice as the engine gives it to the model equals the training renderer's windowing of the
    same HU values (data/anatomy.py: `window`, the abdomen window every CT training slice of the shipped model
    went through): a wider or shifted window shows the model other images than it learnt on."""
    from MediRoundCore.data.anatomy import window

    volume, _, index, _ = demo_variant("original")
    assert volume.modality == "CT"
    shown = extract_slice(volume, "axial", index)
    np.testing.assert_allclose(shown.normalized(), window(shown.pixels, "CT", "abdomen"), atol=1e-6)
    assert 0.05 < float((shown.normalized() == 0).mean()) < 0.95  # the window clips air and bone both
    assert float((shown.normalized() == 1).mean()) > 0.0005


def test_an_mr_slice_is_scaled_as_the_training_renderer_does():
    """MR slices: the engine's 0.5-99.5 percentile scaling equals the training renderer's (data/anatomy.py)."""
    from MediRoundCore.data.anatomy import window
    from MediRoundCore.imaging import Volume

    rng = np.random.default_rng(4)
    array = rng.gamma(2.0, 150.0, size=(3, 40, 56)).astype(np.float32)  # MR-like: positive, long tail
    volume = Volume(array, (1.0, 1.0, 3.0), (0.0, 0.0, 0.0), modality="MR")
    shown = extract_slice(volume, "axial", 1)
    np.testing.assert_allclose(shown.normalized(), window(shown.pixels, "MR", "brain"), atol=1e-6)


def test_references_a_user_gives_the_shipped_model(shipped):
    """On the demo slice: the left kidney, then the spleen; "the lesion inside the left kidney" refers to the
    kidney's round (the name, not the previous round) and finds the lesion; a round the user picks (the spleen,
    round 2) wins over the entity the query names. (Ties between rounds of one entity: tests/test_session.py.)"""
    volume, labels, index, script = demo_variant("original")
    session = Session(volume.fingerprint())
    session.volume = volume
    image = extract_slice(volume, "axial", index)
    truth = extract_slice(labels, "axial", index).pixels
    kidney, lesion, spleen = script[0]["expected_label"], script[1]["expected_label"], script[3]["expected_label"]
    for query in ("Segment the left kidney.", "Segment the spleen."):
        shipped.ask(session, query, image)
    assert [r.entity for r in session.rounds] == ["left kidney", "spleen"]
    assert dice(session.rounds[1].mask, truth == spleen) >= FLOORS[3]
    r3 = shipped.ask(session, "Now the lesion inside the left kidney.", image).round
    assert r3.reference == 1 and dice(r3.mask, truth == lesion) >= FLOORS[1]
    r4 = shipped.ask(session, "Now the lesion inside the left kidney.", image, reference=2).round
    assert r4.reference == 2
    assert dice(session.rounds[0].mask, truth == kidney) >= FLOORS[0]


def _both_kidneys(shipped):
    volume, labels, index, script = demo_variant("original")
    session = Session(volume.fingerprint())
    session.volume = volume
    image = extract_slice(volume, "axial", index)
    for query in ("Segment the right kidney.", "Segment the left kidney."):
        assert not shipped.ask(session, query, image).round.absent
    return session, image, extract_slice(labels, "axial", index).pixels, script


def test_the_lesion_in_it_after_both_kidneys_is_found_in_the_kidney_that_has_one(shipped):
    """On the demo slice only the left kidney has a lesion. After the right then the left kidney, "Now the lesion
    inside it." names no round; the reference scorer alone guesses the right kidney (round 1), and the lesion
    finder's look at each kidney's mask moves the guess to the left one, which the answer then finds, with no
    other kidney said to fit as well."""
    session, image, truth, script = _both_kidneys(shipped)
    assert session.reference_candidates("Now the lesion inside it.", None, shipped.reference_scorer)[:2] == [1, 2]
    found = shipped.ask(session, "Now the lesion inside it.", image).round
    assert found.reference == 2 and found.entity == "lesion in the left kidney", found.answer
    assert found.reference_guessed and found.reference_alternatives == []
    assert dice(found.mask, truth == script[1]["expected_label"]) >= FLOORS[1]
    # without the finder the guess is the right kidney, as the text alone reads it
    finder, shipped.lesion_finder = shipped.lesion_finder, None
    try:
        session.undo()
        assert shipped.ask(session, "Now the lesion inside it.", image).round.reference == 1
    finally:
        shipped.lesion_finder = finder


@pytest.mark.xfail(strict=True, reason="known fault (design notes, session 40): the shipped model draws a lesion in "
                   "whichever kidney the reference is; when it answers absent there, move this out of xfail")
def test_the_lesion_in_the_kidney_without_one_is_answered_absent(shipped):
    """Asked on the right kidney by the user's pick, "Now the lesion inside it." should be answered absent, with
    no segment (the demo's right kidney has none)."""
    session, image, _, _ = _both_kidneys(shipped)
    picked = shipped.ask(session, "Now the lesion inside it.", image, reference=1).round
    assert picked.reference == 1 and picked.absent and not picked.mask.any(), picked.answer


def test_last_slice_and_one_past_it_with_the_shipped_model(tmp_path, capsys):
    """`ask --slice 23` on the 24-slice demo answers; `--slice 24` gets the range message, not an internal error."""
    from MediRoundCore.cli import BUNDLED, main

    ask = ["ask", str(BUNDLED / "demo_abdomen.nrrd"), "--session", str(tmp_path / "s"), "--query",
           "Segment the liver.", "--device", "cpu"]
    assert main(ask + ["--slice", "24"]) == 2
    err = capsys.readouterr().err
    assert "slice index 24 is out of range for the axial view (0..23)" in err and "internal error" not in err
    assert main(ask + ["--slice", "23"]) == 0
    assert "round 1: liver" in capsys.readouterr().out


def test_direct_requests_in_later_rounds_are_answered_not_called_absent(shipped):
    """A user names organ after organ: every one on the slice gets its segment (a model trained on absent rounds
    alone, all of them direct requests, answered "Segment the spleen." in round 2 with "not on this slice")."""
    volume, labels, index, script = demo_variant("original")
    session = Session(volume.fingerprint())
    session.volume = volume
    image = extract_slice(volume, "axial", index)
    truth = extract_slice(labels, "axial", index).pixels
    kidney, spleen = script[0]["expected_label"], script[3]["expected_label"]
    for query, label in (("Segment the left kidney.", kidney), ("Segment the spleen.", spleen)):
        r = shipped.ask(session, query, image).round
        assert not r.absent and dice(r.mask, truth == label) >= 0.8, (query, r.answer)
    for query in ("Segment the liver.", "Segment the aorta."):
        r = shipped.ask(session, query, image).round
        assert not r.absent and r.mask.any() and query.split()[-1].strip(".") in (r.entity or ""), (query, r.answer)


def test_a_structure_not_on_the_slice_is_answered_as_absent(shipped):
    """The demo's abdominal slice: after the left kidney, "Segment the left lung." is answered as absent with no
    mask, and the spleen asked next is segmented. (Measured over many dialogues: QUALITY.md, "Absent targets".)"""
    volume, labels, index, script = demo_variant("original")
    session = Session(volume.fingerprint())
    session.volume = volume
    image = extract_slice(volume, "axial", index)
    truth = extract_slice(labels, "axial", index).pixels
    shipped.ask(session, "Segment the left kidney.", image)
    lung = shipped.ask(session, "Segment the left lung.", image).round
    assert lung.absent and not lung.mask.any() and lung.entity == "left lung", lung.answer
    spleen = shipped.ask(session, "Segment the spleen.", image).round
    assert not spleen.absent and dice(spleen.mask, truth == script[3]["expected_label"]) >= FLOORS[3]


def test_a_first_question_about_an_absent_structure(shipped):
    """A dialogue that opens with a structure of another region ("Segment the heart." on the abdominal slice) is
    answered as absent, and the organ asked next is segmented, not called absent in turn (phase I's model drew a
    heart and then answered the left kidney as absent)."""
    volume, labels, index, script = demo_variant("original")
    session = Session(volume.fingerprint())
    session.volume = volume
    image = extract_slice(volume, "axial", index)
    truth = extract_slice(labels, "axial", index).pixels
    heart = shipped.ask(session, "Segment the heart.", image).round
    assert heart.absent and not heart.mask.any() and heart.entity == "heart", heart.answer
    kidney = shipped.ask(session, "Segment the left kidney.", image).round
    assert kidney.reference is None  # nothing to refer to: the heart has no mask
    assert not kidney.absent and dice(kidney.mask, truth == script[0]["expected_label"]) >= FLOORS[0]


def _ask_again(engine, target_query):
    volume, labels, index, script = demo_variant("original")
    session = Session(volume.fingerprint())
    session.volume = volume
    image = extract_slice(volume, "axial", index)
    for query in ("Segment the left kidney.", "Now the lesion inside it.", "Segment the spleen."):
        engine.ask(session, query, image)
    first = next(r for r in session.rounds if r.query == target_query)
    again = engine.ask(session, target_query, image).round
    return first, again


def test_a_structure_asked_again_is_answered_again(shipped):
    """"Segment the left kidney." asked a second time, after the lesion in it and the spleen, refers to round 1
    (it names its entity) and gets the kidney again (MediRound-Tiny answered the lesion here)."""
    first, again = _ask_again(shipped, "Segment the left kidney.")
    assert again.reference == first.number
    assert again.entity == first.entity and dice(again.mask, first.mask) >= 0.9, again.answer


def test_ask_says_when_the_kidney_it_refers_to_was_a_guess(tmp_path, capsys):
    """After both kidneys, "Segment the renal pelvis of it." refers to a guess (the right kidney) that the other
    kidney fits about as well (each has a pelvis; the shipped scorer's probabilities are within a factor of 2);
    `ask` says so, that the round is kept, and how to replace it."""
    from MediRoundCore.cli import BUNDLED, main

    ask = ["ask", str(BUNDLED / "demo_abdomen.nrrd"), "--session", str(tmp_path / "s"), "--slice", "12",
           "--device", "cpu", "--query"]
    for query in ("Segment the right kidney.", "Segment the left kidney."):
        assert main(ask + [query]) == 0
    assert "was a guess" not in capsys.readouterr().out
    assert main(ask + ["Segment the renal pelvis of it."]) == 0
    out = capsys.readouterr().out
    assert "the reference R1 was a guess; R2 (left kidney) fits about as well; this round is kept" in out, out
    assert ":undo it in `mediround chat --session`" in out
    rounds = Session.load(tmp_path / "s").rounds
    assert (rounds[-1].reference, rounds[-1].reference_guessed, rounds[-1].reference_alternatives) == (1, True, [2])


def _generated_rounds(engine, split, seed, index, rounds):
    """The first `rounds` rounds of a generated dialogue, asked with its own references: the last round, its
    ground-truth mask and its query."""
    from MediRoundCore.data.splits import make_dialogue, to_sample
    from MediRoundCore.evaluate.protocol import sample_fingerprint, sample_image

    sample = to_sample(make_dialogue(split, seed, index))
    image = sample_image(sample)
    session = Session(sample_fingerprint(sample))
    for k in range(rounds):
        ref = sample.ref_indices[k]
        r = engine.ask(session, sample.queries[k], image, reference=None if ref is None else ref + 1).round
    return r, np.asarray(sample.masks[rounds - 1], bool), sample.queries[rounds - 1]


def test_the_smaller_nodule_is_one_nodule(shipped):
    """Hard split seed 1, dialogue 6: after the left lung, "Find the smaller nodule inside that structure" — the
    mask decoder outlines both nodules of the lung (Dice 0.56); the answer's size word keeps the smaller one
    (mask_components.py)."""
    r, truth, query = _generated_rounds(shipped, "hard", 1, 6, 3)
    assert "smaller nodule" in query and r.entity == "smaller nodule in the left lung", (query, r.answer)
    assert dice(r.mask, truth) >= 0.9
    rule, shipped.one_lesion_by_size = shipped.one_lesion_by_size, False
    try:
        whole, _, _ = _generated_rounds(shipped, "hard", 1, 6, 3)
    finally:
        shipped.one_lesion_by_size = rule
    assert dice(whole.mask, truth) < 0.7 and whole.mask.sum() > 1.5 * r.mask.sum()
