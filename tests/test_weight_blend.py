"""Weight-space blends of two checkpoints of one model (train/weight_blend.py): the blended folder loads as the
model, each tensor is (1 − α)·A + α·B with a part's own α where one is given, and what cannot be blended is
refused without writing anything."""

import json

import pytest
import torch

from MediRoundCore.errors import CheckpointError, ConfigError
from MediRoundCore.model.modeling import MediRound
from MediRoundCore.train.weight_blend import blend_checkpoints, main

from test_carry_jcm import saved


def weights(folder):
    return MediRound.from_pretrained(folder)[0].state_dict()


def test_each_tensor_is_the_blend_and_a_part_takes_its_own_alpha(tmp_path):
    a, b = saved(tmp_path, "a", seed=1), saved(tmp_path, "b", seed=2)
    (b / "answer_drafts.json").write_text("{}")  # B's files beside the weights are kept
    out = blend_checkpoints(a, b, 0.25, tmp_path / "blend", parts={"segmenter.mask_decoder": 1.0})
    wa, wb, mine = weights(a), weights(b), weights(out)
    decoder = [k for k in mine if k.startswith("segmenter.mask_decoder.")]
    rest = [k for k in mine if not k.startswith("segmenter.mask_decoder.") and mine[k].is_floating_point()]
    assert decoder and rest
    differ = [k for k in rest if not torch.equal(wa[k], wb[k])]
    assert differ  # the two models differ outside the decoder, so the blend is seen there
    for k in rest:
        assert torch.allclose(mine[k], 0.75 * wa[k] + 0.25 * wb[k], atol=1e-6), k
    for k in decoder:
        assert torch.equal(mine[k], wb[k]), k
    assert (out / "answer_drafts.json").read_text() == "{}"
    assert json.loads((out / "config.json").read_text()) == json.loads((b / "config.json").read_text())


def test_alpha_zero_is_a(tmp_path):
    a, b = saved(tmp_path, "a", seed=1), saved(tmp_path, "b", seed=2)
    wa, mine = weights(a), weights(blend_checkpoints(a, b, 0.0, tmp_path / "blend"))
    assert all(torch.equal(mine[k], wa[k]) for k in wa)


def test_what_cannot_be_blended_is_refused_and_nothing_written(tmp_path):
    a, b = saved(tmp_path, "a", seed=1), saved(tmp_path, "b", seed=2)
    config = json.loads((b / "config.json").read_text())
    config["max_answer_tokens"] = 9
    (b / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="max_answer_tokens"):
        blend_checkpoints(a, b, 0.5, tmp_path / "blend")
    b = saved(tmp_path, "b", seed=2)
    with pytest.raises(ConfigError, match="from 0 to 1"):
        blend_checkpoints(a, b, 1.5, tmp_path / "blend")
    with pytest.raises(ConfigError, match="no tensor lies under segmenter.mask_dec$"):
        blend_checkpoints(a, b, 0.5, tmp_path / "blend", parts={"segmenter.mask_dec": 1.0})
    with pytest.raises(CheckpointError, match="not over an input"):
        blend_checkpoints(a, b, 0.5, a)
    assert not (tmp_path / "blend").exists()


def test_command_line(tmp_path, capsys):
    a, b = saved(tmp_path, "a", seed=1), saved(tmp_path, "b", seed=2)
    assert main([str(a), str(b), "0.5", str(tmp_path / "blend"), "--part", "jcm=0"]) == 0
    wa, wb, mine = weights(a), weights(b), weights(tmp_path / "blend")
    assert all(torch.equal(mine[k], wa[k]) for k in mine if k.startswith("jcm."))
    assert main([str(a), str(b), "0.5", str(tmp_path / "other"), "--part", "nothing.here=1"]) == 2
    assert "no tensor lies under nothing.here" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main([str(a), str(b), "0.5", str(tmp_path / "other"), "--part", "jcm"])
    assert not (tmp_path / "other").exists()
