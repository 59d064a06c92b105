"""Carrying a trained JCM onto a continued stage-1 model (train/carry_jcm.py): the result has the stage-1
model's weights and the donor's JCM, settings and all, and loads as one model."""

import json

import pytest
import torch

from MediRoundCore.errors import CheckpointError
from MediRoundCore.model.modeling import MediRound
from MediRoundCore.train.carry_jcm import carry_jcm

from test_lite_training import small_lite


def saved(tmp_path, name, seed, refiner=False, beta=0.5):
    model, tokenizer = small_lite(seed)
    model.config.base_weights = {}  # toy widths: every tensor in the folder
    if refiner:
        model.config.jcm.correction_refiner = True
        model = MediRound(model.config, model.token_ids)
        torch.manual_seed(seed + 100)
        for p in model.parameters():
            p.data.normal_(0, 0.05)
    model.config.jcm.beta = beta
    model.save_pretrained(tmp_path / name, tokenizer)
    return tmp_path / name


def test_the_result_is_stage1_with_the_donors_jcm(tmp_path):
    stage1 = saved(tmp_path, "stage1", seed=1)
    donor = saved(tmp_path, "donor", seed=2, refiner=True, beta=0.9)
    (donor / "reference_scorer.json").write_text(json.dumps({"buckets": 16, "max_back": 8, "version": 1}))
    (donor / "reference_scorer.safetensors").write_bytes(b"the donor's")
    out = carry_jcm(stage1, donor, tmp_path / "carried")
    model, _ = MediRound.from_pretrained(out)
    first, _ = MediRound.from_pretrained(stage1)
    second, _ = MediRound.from_pretrained(donor)
    assert model.config.jcm == second.config.jcm and model.config.jcm.beta == 0.9
    assert model.jcm.refiner is not None and first.jcm.refiner is None
    mine, a, b = model.state_dict(), first.state_dict(), second.state_dict()
    jcm = [k for k in mine if k.startswith("jcm.")]
    assert jcm and all(torch.equal(mine[k], b[k]) for k in jcm)
    rest = [k for k in mine if not k.startswith("jcm.")]
    assert all(torch.equal(mine[k], a[k]) for k in rest)
    assert any(not torch.equal(a[k], b[k]) for k in rest)  # the two models did differ there
    # the donor's reference scorer, as stage 1 had none (both of its files from one folder)
    assert (out / "reference_scorer.safetensors").read_bytes() == b"the donor's"
    with pytest.raises(CheckpointError, match="not over, inside or around an input"):
        carry_jcm(stage1, donor, stage1)
    assert MediRound.from_pretrained(stage1)[0].jcm.refiner is None


def test_models_that_differ_beyond_the_jcm_are_refused(tmp_path):
    stage1 = saved(tmp_path, "stage1", seed=1)
    config = json.loads((stage1 / "config.json").read_text())
    config["max_answer_tokens"] = 9
    other = tmp_path / "other"
    other.mkdir()
    for f in stage1.iterdir():
        (other / f.name).write_bytes(f.read_bytes())
    (other / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="max_answer_tokens"):
        carry_jcm(stage1, other, tmp_path / "carried")
    assert not (tmp_path / "carried").exists()
