"""Weight-space blends of two checkpoints of one model (train/weight_blend.py) and the all-or-nothing writing of
a model folder made from others (train/folders.py): the blend loads as the model, each tensor is (1 − α)·A + α·B
with a part's own α where one is given, and what cannot be blended or written is refused without touching the
inputs or leaving anything behind."""

import json

import pytest
import torch

from MediRoundCore.errors import CheckpointError, ConfigError
from MediRoundCore.model.modeling import MediRound
from MediRoundCore.train.folders import write_folder
from MediRoundCore.train.weight_blend import blend_checkpoints, main

from test_carry_jcm import saved


def weights(folder):
    return MediRound.from_pretrained(folder)[0].state_dict()


def under(state, prefix):
    return [k for k in state if k.startswith(prefix + ".") and state[k].is_floating_point()]


def test_each_tensor_is_the_blend_and_the_longest_part_decides(tmp_path):
    a, b = saved(tmp_path, "a", seed=1), saved(tmp_path, "b", seed=2)
    (b / "answer_drafts.json").write_text("{}")  # B's files beside the weights are kept
    out = blend_checkpoints(a, b, 0.25, tmp_path / "blend",
                            parts={"segmenter": 0.5, "segmenter.mask_decoder.": 1.0})
    wa, wb, mine = weights(a), weights(b), weights(out)
    decoder = under(mine, "segmenter.mask_decoder")
    segmenter = [k for k in under(mine, "segmenter") if k not in decoder]
    rest = [k for k in mine if not k.startswith("segmenter.") and mine[k].is_floating_point()]
    for keys in (decoder, segmenter, rest):  # the two models differ in each group, so each blend is seen
        assert keys and any(not torch.equal(wa[k], wb[k]) for k in keys)
    for keys, t in ((rest, 0.25), (segmenter, 0.5), (decoder, 1.0)):
        for k in keys:
            assert torch.allclose(mine[k], (1 - t) * wa[k] + t * wb[k], atol=1e-6), k
    assert (out / "answer_drafts.json").read_text() == "{}"
    assert not (tmp_path / "blend.tmp").exists()


def test_alpha_zero_is_a_and_a_second_blend_replaces_the_first(tmp_path):
    a, b = saved(tmp_path, "a", seed=1), saved(tmp_path, "b", seed=2)
    out = blend_checkpoints(a, b, 1.0, tmp_path / "blend")
    (out / "stale.txt").write_text("from the first blend")
    wa, mine = weights(a), weights(blend_checkpoints(a, b, 0.0, out))
    assert all(torch.equal(mine[k], wa[k]) for k in wa)
    assert not (out / "stale.txt").exists()


@pytest.mark.parametrize("alpha, parts, message", [
    (1.5, {}, "from 0 to 1"), (float("nan"), {}, "from 0 to 1"), (0.5, {"jcm": float("inf")}, "from 0 to 1"),
    (0.5, {"segmenter.mask_dec": 1.0}, "no weight lies under segmenter.mask_dec "),
    (0.5, {"jcm": 1.0, "jcm.": 0.0}, "given twice")])
def test_bad_alphas_and_parts_are_refused(tmp_path, alpha, parts, message):
    a, b = saved(tmp_path, "a", seed=1), saved(tmp_path, "b", seed=2)
    with pytest.raises(ConfigError, match=message):
        blend_checkpoints(a, b, alpha, tmp_path / "blend", parts=parts)
    assert not (tmp_path / "blend").exists() and not (tmp_path / "blend.tmp").exists()


def test_what_cannot_be_blended_or_written_there_is_refused_and_nothing_touched(tmp_path):
    a, b = saved(tmp_path, "a", seed=1), saved(tmp_path, "b", seed=2)
    config = json.loads((b / "config.json").read_text())
    config["max_answer_tokens"] = 9
    (b / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="max_answer_tokens"):
        blend_checkpoints(a, b, 0.5, tmp_path / "blend")
    b = saved(tmp_path, "b", seed=2)
    before = {f.name: f.read_bytes() for f in a.iterdir()}
    for out in (a, a / "inside", tmp_path):  # over, inside and around an input
        with pytest.raises(CheckpointError, match="not over, inside or around an input"):
            blend_checkpoints(a, b, 0.5, out)
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "keep.txt").write_text("mine")
    with pytest.raises(CheckpointError, match="is not a model folder"):
        blend_checkpoints(a, b, 0.5, notes)
    assert (notes / "keep.txt").read_text() == "mine"
    assert {f.name: f.read_bytes() for f in a.iterdir()} == before
    assert not (tmp_path / "blend").exists()


def test_a_failed_write_leaves_the_old_folder_and_no_partial_one(tmp_path):
    out = tmp_path / "model"
    out.mkdir()
    (out / "config.json").write_text("{}")

    def half_written(tmp):
        tmp.mkdir()
        (tmp / "config.json").write_text('{"new": 1}')
        raise OSError("No space left on device")

    with pytest.raises(OSError, match="No space"):
        write_folder(out, half_written)
    assert (out / "config.json").read_text() == "{}"
    assert not (tmp_path / "model.tmp").exists()


def test_command_line(tmp_path, capsys):
    a, b = saved(tmp_path, "a", seed=1), saved(tmp_path, "b", seed=2)
    assert main([str(a), str(b), "0.5", str(tmp_path / "blend"), "--part", "jcm=0"]) == 0
    wa, wb, mine = weights(a), weights(b), weights(tmp_path / "blend")
    jcm = under(mine, "jcm")
    assert jcm and any(not torch.equal(wa[k], wb[k]) for k in jcm)
    assert all(torch.equal(mine[k], wa[k]) for k in jcm)
    assert main([str(a), str(b), "0.5", str(tmp_path / "other"), "--part", "nothing.here=1"]) == 2
    assert "error: no weight lies under nothing.here" in capsys.readouterr().err
    for bad in (["--part", "jcm"], ["--part", "jcm=1", "--part", "jcm.=0"]):
        with pytest.raises(SystemExit):
            main([str(a), str(b), "0.5", str(tmp_path / "other"), *bad])
    assert not (tmp_path / "other").exists()
