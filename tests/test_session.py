"""Sessions: reference resolution, undo, exact save/restore, fingerprint check."""

import numpy as np
import pytest

from MediRoundCore.errors import RoundReferenceError, SessionError
from MediRoundCore.references import resolve_reference
from MediRoundCore.session import Round, Session


def make_round(n, entity="liver", reference=None, shape=(8, 10)):
    mask = np.zeros(shape, bool)
    mask[n % shape[0], : n + 1] = True
    return Round(number=n, view="axial", slice_index=3, query=f"query {n}", answer=f"{entity}: because. ",
                 entity=entity, reference=reference, mask=mask, jcm_score=0.5 + n / 100, corrected=n % 2 == 0,
                 lm_tokens=10 * n, timings={"total_ms": 1.5 * n})


@pytest.mark.parametrize("query, explicit, expected", [
    ("segment the spleen", None, 3),                 # nothing named: the previous round
    ("now the lesion inside the liver", None, 1),    # an entity named before
    ("the cyst in the left kidney", None, 2),        # the longest entity match wins
    ("go back to round 2", None, 2),
    ("the second round's organ", None, 2),
    ("the first mask, again", None, 1),
    ("anything", 3, 3),                              # the user's pick wins
    ("round 9 please", None, 3),                     # a round that does not exist is not a reference
])
def test_reference_resolution(query, explicit, expected):
    entities = ["liver", "left kidney", "kidney"]
    assert resolve_reference(query, entities, explicit) == expected


def test_first_round_has_no_reference_and_bad_explicit_raises():
    assert resolve_reference("segment the liver", []) is None
    with pytest.raises(RoundReferenceError, match="no rounds yet"):
        resolve_reference("x", [], 1)
    with pytest.raises(RoundReferenceError, match="round 4"):
        resolve_reference("x", ["a", "b"], 4)


def test_save_restore_exact(tmp_path):
    s = Session("abc123", tmp_path / "s", "demo.nrrd")
    for n in (1, 2, 3):
        s.add_round(make_round(n, reference=n - 1 or None))
    loaded = Session.load(tmp_path / "s", expected_fingerprint="abc123")
    assert loaded.volume_name == "demo.nrrd" and len(loaded.rounds) == 3
    for a, b in zip(s.rounds, loaded.rounds):
        assert a.to_json() == b.to_json()
        assert np.array_equal(a.mask, b.mask) and b.mask.dtype == bool


def test_undo_persists(tmp_path):
    s = Session("abc", tmp_path)
    s.add_round(make_round(1))
    s.add_round(make_round(2))
    assert s.undo().number == 2
    assert [r.number for r in Session.load(tmp_path).rounds] == [1]
    s.undo()
    with pytest.raises(SessionError, match="nothing to undo"):
        s.undo()


def test_other_volume_refused(tmp_path):
    s = Session("abc", tmp_path)
    s.add_round(make_round(1))
    with pytest.raises(SessionError, match="another volume"):
        Session.load(tmp_path, expected_fingerprint="zzz")


def test_round_numbers_must_follow(tmp_path):
    s = Session("abc", tmp_path)
    with pytest.raises(SessionError, match="does not follow"):
        s.add_round(make_round(2))
    assert not (tmp_path / "session.json").exists()


KILL_BETWEEN_FILES = """
import os, signal, sys
import numpy as np
from MediRoundCore import session as session_module
from MediRoundCore.session import Round, Session

folder, action = sys.argv[1], sys.argv[2]
def round_(n):
    mask = np.zeros((8, 10), bool)
    mask[n, : n + 1] = True
    return Round(n, "axial", 3, f"query {n}", "liver: x.", "liver", None, mask)
s = Session("abc", folder)
s.add_round(round_(1))
s.add_round(round_(2))
real_replace = os.replace
def replace_then_die(tmp, target):  # the first staged file of the save is put in place for real, then the process dies
    real_replace(tmp, target)
    print(os.path.basename(target), flush=True)
    os.kill(os.getpid(), signal.SIGKILL)
session_module.os.replace = replace_then_die
s.add_round(round_(3)) if action == "add" else s.undo()
"""


@pytest.mark.parametrize("action, survivors", [("add", [1, 2]), ("undo", [1])])
def test_crash_between_files_keeps_a_consistent_session(tmp_path, action, survivors):
    """A process killed (SIGKILL) between the two file writes of a save: adding writes the masks first (the JSON
    still lists the rounds before), undoing writes the JSON first (it lists the remaining rounds, whose masks are
    all there). The folder loads, with exactly the rounds of before the add or after the undo."""
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    done = subprocess.run([sys.executable, "-c", KILL_BETWEEN_FILES, str(tmp_path), action], capture_output=True,
                          text=True, timeout=120, cwd=root, env={**__import__("os").environ, "PYTHONPATH": str(root)})
    assert done.returncode == -9, done.stderr  # it really died there
    first = done.stdout.split()
    assert first == (["masks.npz"] if action == "add" else ["session.json"])
    loaded = Session.load(tmp_path)
    assert [r.number for r in loaded.rounds] == survivors
    for r in loaded.rounds:
        assert r.mask[r.number].sum() == r.number + 1


# -- precedence of the reference (DESIGN "Sessions and references"): picked > named > previous ----------------
@pytest.mark.parametrize("query, entities, explicit, expected", [
    # 1. the user's pick wins over a round number and over an entity the query names
    ("go back to round 1", ["liver", "spleen", "kidney"], 2, 2),
    ("now the lesion inside the liver", ["liver", "spleen", "kidney"], 3, 3),
    ("the first mask, again", ["liver", "spleen"], 2, 2),
    # 2. a round the query names wins over the previous round: by number, by ordinal, by entity
    ("the cyst in round 1", ["liver", "spleen", "kidney"], None, 1),
    ("the second round's organ", ["liver", "spleen", "kidney"], None, 2),
    ("now the lesion inside the liver", ["liver", "spleen", "kidney"], None, 1),
    # a number named wins over an entity named in the same query
    ("the spleen of round 1", ["liver", "spleen", "kidney"], None, 1),
    # ties between rounds of the same entity go to the most recent of them (the one the user last saw)
    ("now the lesion inside the liver", ["liver", "spleen", "liver", "kidney"], None, 3),
    ("the liver again", ["liver", "liver", "spleen"], None, 2),
    # 3. nothing named: the previous round
    ("segment the gallbladder", ["liver", "spleen", "kidney"], None, 3),
])
def test_reference_precedence(query, entities, explicit, expected):
    assert resolve_reference(query, entities, explicit) == expected


def test_session_resolves_with_the_same_precedence(tmp_path):
    s = Session("abc")
    for n, entity in enumerate(["liver", "spleen", "liver", "kidney"], start=1):
        s.add_round(make_round(n, entity=entity))
    assert s.resolve_reference("now the lesion inside the liver") == 3
    assert s.resolve_reference("now the lesion inside the liver", explicit=1) == 1
    assert s.resolve_reference("segment the aorta") == 4


def test_fingerprint_covers_geometry_and_a_session_refuses_a_moved_copy(tmp_path):
    """Same voxels with another spacing, origin or direction is another volume for a session: its masks would
    land elsewhere in the patient."""
    from MediRoundCore.imaging import Volume

    rng = np.random.default_rng(0)
    array = rng.integers(-1000, 400, size=(5, 12, 16)).astype(np.int16)
    base = dict(spacing=(0.8, 0.8, 2.5), origin=(-10.0, 20.0, 30.0), direction=np.eye(3))
    fp = Volume(array.copy(), **base).fingerprint()
    assert Volume(array.copy(), **base).fingerprint() == fp
    flipped = np.diag([-1.0, 1.0, 1.0])
    rotated = np.array([[0.0, -1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])
    copies = {"spacing": dict(base, spacing=(0.8, 0.8, 1.25)), "in-plane spacing": dict(base, spacing=(0.9, 0.8, 2.5)),
              "origin": dict(base, origin=(-10.0, 20.0, 35.0)), "direction flip": dict(base, direction=flipped),
              "direction rotation": dict(base, direction=rotated)}
    s = Session(fp, tmp_path / "s")
    s.add_round(make_round(1))
    for what, geometry in copies.items():
        other = Volume(array.copy(), **geometry).fingerprint()
        assert other != fp, what
        with pytest.raises(SessionError, match="another volume"):
            Session.load(tmp_path / "s", expected_fingerprint=other)
    assert len(Session.load(tmp_path / "s", expected_fingerprint=fp).rounds) == 1


def test_a_round_answered_absent_is_not_the_next_rounds_reference():
    """After "heart: not on this slice." the next "it" goes to the last round with a mask, by default and by
    entity name; "round 2" still reaches it."""
    from MediRoundCore.session import Round, Session

    s = Session("referable-test")
    blank = np.zeros((4, 4), bool)
    for number, (entity, absent) in enumerate([("left kidney", False), ("heart", True)], start=1):
        s.add_round(Round(number=number, view="axial", slice_index=0, query=f"Segment the {entity}.",
                          answer=f"{entity}: ...", entity=entity, reference=None, mask=blank, absent=absent))
    assert s.resolve_reference("Now the lesion inside it.") == 1
    assert s.resolve_reference("Segment the heart.") == 1
    assert s.resolve_reference("The heart from round 2.") == 2


def test_a_guessed_reference_and_its_alternatives_are_saved_sent_and_checked(tmp_path):
    """The guess flag and its close alternatives survive save/load and the wire; bad values are refused."""
    import json

    from MediRoundCore.remote.protocol import round_from_wire, round_to_wire

    s = Session("abc123", tmp_path / "s")
    s.add_round(make_round(1, "right kidney"))
    s.add_round(make_round(2, "left kidney"))
    guessed = make_round(3, "lesion in the right kidney", reference=1)
    guessed.reference_guessed, guessed.reference_alternatives = True, [2]
    s.add_round(guessed)
    loaded = Session.load(tmp_path / "s")
    assert [(r.reference_guessed, r.reference_alternatives) for r in loaded.rounds] == [(False, []), (False, []),
                                                                                       (True, [2])]
    assert round_from_wire(round_to_wire(guessed)).reference_alternatives == [2]
    for bad in ({"reference_alternatives": [3]}, {"reference_alternatives": "2"}, {"reference_guessed": 1}):
        with pytest.raises(ValueError, match="malformed round 3"):
            round_from_wire({k: v for k, v in {**round_to_wire(guessed), **bad}.items() if k != "digest"})
        path = tmp_path / "s" / "session.json"
        data = json.loads(path.read_text())
        good = dict(data["rounds"][2])
        data["rounds"][2].update(bad)
        path.write_text(json.dumps(data))
        with pytest.raises(SessionError, match="corrupt round entry"):
            Session.load(tmp_path / "s")
        data["rounds"][2] = good
        path.write_text(json.dumps(data))
    # a session written before the fields existed loads with no guess recorded
    data = json.loads(path.read_text())
    for item in data["rounds"]:
        item.pop("reference_guessed"), item.pop("reference_alternatives")
    path.write_text(json.dumps(data))
    assert [r.reference_alternatives for r in Session.load(tmp_path / "s").rounds] == [[], [], []]


def test_the_session_says_which_references_are_guesses():
    class Scores:  # stands in for reference_scorer.ReferenceScorer's scores: round 2 likeliest, round 1 close
        def scores(self, query, entities):
            return np.array([0.5, 0.9, -3.0][:len(entities)], np.float32)

    s = Session("abc123")
    for n, entity in enumerate(["right kidney", "left kidney", "liver"], start=1):
        s.add_round(make_round(n, entity))
    assert s.reference_guess("Now the lesion inside it.", None, 2, Scores()) == (True, [1])
    assert s.reference_guess("Now the lesion inside it.", None, 2, Scores(), tried=[1]) == (True, [])
    assert s.reference_guess("Now the lesion inside it.", 2, 2, Scores()) == (False, [])  # picked by the user
    assert s.reference_guess("The lesion in the left kidney.", None, 2, Scores()) == (False, [])  # named
    assert s.reference_guess("Now the lesion inside it.", None, 2, None) == (True, [])  # no scorer: no alternatives
