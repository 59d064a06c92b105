"""`mediround eval --sets`: the paraphrase, absent-target and real-image sets (evaluate/sets.py)."""

import re

import numpy as np
import pytest
import torch

from MediRoundCore.answers import ABSENT_TEXT
from MediRoundCore.engine import RoundResult
from MediRoundCore.errors import MediRoundError
from MediRoundCore.evaluate import run as eval_run
from MediRoundCore.evaluate import sets
from MediRoundCore.evaluate.protocol import OracleEngine
from MediRoundCore.session import Round


def _section(text, name):
    m = re.search(rf"<!-- {name} -->\n(.*?)<!-- /{name} -->", text, re.S)
    return m.group(1) if m else None


def test_oracle_passes_every_set_and_other_sections_are_kept(tmp_path):
    out = tmp_path / "q"
    out.mkdir()
    (out / "QUALITY.md").write_text("# MediRound quality\n\n## Overall\n\nkept by hand-free test\n")
    argv = ["--oracle", "--sets", "paraphrase,absent,real", "--set-limit", "2", "--split", "hard",
            "--out", str(out), "--quiet", "--threads", "1"]
    assert eval_run.main(argv) == 0
    text = (out / "QUALITY.md").read_text()
    assert "## Overall\n\nkept by hand-free test" in text
    para, absent, real = (_section(text, n) for n in ("paraphrase", "absent", "real"))
    assert para.count("**PASS**") == 2 and "| held-out paraphrase | " in para and "gap 0.0" in para
    assert absent.count("**PASS**") == 2 and re.search(r"\| absent targets \| [1-9]\d* \| 100\.0 % \|", absent)
    assert "| present targets | " in absent and "| 0.0 % | 100.0 |" in absent
    if "No real labelled volumes" not in real:  # the shared data folder is there on the project machines
        from MediRoundCore.data.real_validation import mni152_folder

        rounds = 7 + (2 if mni152_folder() is not None else 0)  # the MNI152 hemispheres where fetched
        assert "| lung1 | CT | right lung | lung | HU threshold | 100.0 |" in real and f"| all | {rounds} | 100.0 |" in real
        # what was answered, beside each Dice (here the ground truth's answer), and how many said "absent"
        assert "| 100.0 | right lung: the air-filled organ on that side. |" in real
        assert f"Every target asked in these dialogues is on its slice: 0 of {rounds} answered as not on the slice." \
            in real
        # each chest CT's lungs over its extent: 8 slices, left then right lung
        assert "| lung1 | 8 | 16 | 100.0 | 100.0 | 0 |" in real and "| lung2 | 8 | 16 | 100.0 | 100.0 | 0 |" in real
        if rounds == 9:
            assert "| mni152 | MR | left hemisphere | hemisphere | ICBM152 grey+white matter maps, midline split | 100.0 |" \
                in real and "| source: MR (brain template MR) | 2 | 100.0 |" in real
    # a second run of one set replaces its section only
    assert eval_run.main(argv[:2] + ["absent"] + argv[3:]) == 0
    again = (out / "QUALITY.md").read_text()
    assert again.count("<!-- absent -->") == 1 and _section(again, "paraphrase") == para


def test_the_main_evaluation_keeps_the_set_sections(tmp_path):
    md = tmp_path / "QUALITY.md"
    sets.write_section(md, "absent", "## Absent targets\n\nnumbers")
    old = md.read_text()
    assert sets.kept_sections(old).strip() == "<!-- absent -->\n## Absent targets\n\nnumbers\n<!-- /absent -->"
    assert sets.kept_sections("# no sections\n") == ""


def test_random_model_absent_and_paraphrase_sets_measure_its_answers(tiny_engine, monkeypatch):
    """An untrained model never answers absent (it babbles until closed with [SEG]): 0 % absent, MISS."""
    from MediRoundCore.evaluate.protocol import EvalEngine

    monkeypatch.setattr(tiny_engine.model.config, "max_answer_tokens", 3)
    predictor = EvalEngine.from_engine(tiny_engine)
    res = sets.absent_set(predictor, "hard", 0, 2)
    (hit, false) = res.verdicts
    assert hit[2] == "MISS" and hit[1].startswith("0.0 %") and false[2] == "PASS" and false[1].startswith("0.0 %")
    res = sets.paraphrase_set(predictor, "hard", 0, 1)
    assert res.rounds > 0 and res.verdicts[1][2] == "MISS"


def test_bad_set_names_are_a_clear_error(tmp_path):
    with pytest.raises(MediRoundError, match="unknown set"):
        eval_run.main(["--oracle", "--sets", "paraphrase,nope", "--out", str(tmp_path)])
    with pytest.raises(MediRoundError, match="--set-limit"):
        eval_run.main(["--oracle", "--sets", "absent", "--set-limit", "0", "--out", str(tmp_path)])


def test_oracle_rounds_flag_absent_answers():
    from MediRoundCore.evaluate.sets import absent_sample

    sample = absent_sample("hard", 0, 0)
    run = sets._run(OracleEngine(), sample, "0", None)
    assert [r.absent for r in run.session.rounds] == sample.meta["absent"] and any(sample.meta["absent"])


class _RightLungAbsentOracle(OracleEngine):
    """The ground truth, except that every right lung is answered "not on this slice" with no mask."""

    def ask(self, session, query, image, reference=None, use_jcm=True, beta=None, progress=None):
        if "right lung" not in query:
            return super().ask(session, query, image, reference, use_jcm, beta, progress)
        round_ = Round(number=len(session.rounds) + 1, view=image.view, slice_index=image.index, query=query,
                       answer=f"right lung: {ABSENT_TEXT}.", entity="right lung", reference=None,
                       mask=np.zeros(image.pixels.shape, bool), absent=True)
        session.add_round(round_)
        return RoundResult(round_, torch.zeros(256), torch.zeros(256))


def test_the_lung_extent_table_counts_misses_and_absent_answers():
    from MediRoundCore.data.real_validation import default_data_dir

    if not (default_data_dir() / "lung1_image.nrrd").is_file():
        pytest.skip("real labelled volumes not on this machine")
    lines, rounds = sets.lung_extent_lines(_RightLungAbsentOracle(), default_data_dir())
    assert rounds == 32  # 8 slices x 2 lungs, both CTs
    assert "| lung1 | 8 | 16 | 50.0 | 0.0 | 8 |" in lines and "| lung2 | 8 | 16 | 50.0 | 0.0 | 8 |" in lines
    assert sets.lung_extent_lines(_RightLungAbsentOracle(), default_data_dir() / "missing") == ([], 0)
