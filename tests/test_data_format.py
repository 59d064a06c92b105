"""MR-MedSeg format: reader on a hand-written public-format sample, exact round trip, validation errors."""

import json

import numpy as np
import pytest
from PIL import Image

from MediRoundCore.answers import SEG_TOKEN
from MediRoundCore.data.dataset import MRMedSegDataset, collate_samples
from MediRoundCore.data.mrmedseg import read_conversations, write_conversations
from MediRoundCore.errors import DatasetError

# A hand-written sample in the public format (one bare object, as the public data_sample.json).
SAMPLE = {
    "task": "segmentation",
    "base": "[null]",
    "conversations": [
        {"from": "human", "value": "[IMAGE256:images/s1.png] Segment the target region in the medical image."},
        {"from": "gpt", "value": "[MASK-DECODE:masks/s1_round_00.png]."},
        {"from": "human", "value": "[MASK-ENCODE:masks/s1_round_00.png][BOX-ENCODE:masks/s1_round_00.png] "
                                   "Segment the lesion inside it.", "ind": 0},
        {"from": "gpt", "value": "The segmentation output is "
                                 "[REF-DECODE:masks/s1_round_00.png][MASK-DECODE:masks/s1_round_01.png]."},
        {"from": "human", "value": "[MASK-ENCODE:masks/s1_round_00.png][BOX-ENCODE:masks/s1_round_00.png] "
                                   "Now the kidney to the patient's left of it.", "ind": 0},
        {"from": "gpt", "value": "left kidney: it lies to the patient's left of it. "
                                 "[REF-DECODE:masks/s1_round_00.png][MASK-DECODE:masks/s1_round_02.png]."},
    ],
}


def _write_sample(folder, obj=SAMPLE, size=(24, 20), mask_size=None):
    (folder / "images").mkdir(parents=True, exist_ok=True)
    (folder / "masks").mkdir(exist_ok=True)
    h, w = size
    img = (np.arange(h * w).reshape(h, w) % 256).astype(np.uint8)
    Image.fromarray(np.stack([img] * 3, -1)).save(folder / "images/s1.png")  # RGB like real data
    mh, mw = mask_size or size
    for k, box in enumerate([(2, 15, 2, 15), (5, 8, 5, 8), (10, 18, 12, 19)]):
        m = np.zeros((mh, mw), np.uint8)
        m[box[0]:box[1], box[2]:box[3]] = 255
        Image.fromarray(m).save(folder / f"masks/s1_round_{k:02d}.png")
    path = folder / "sample.json"
    path.write_text(json.dumps(obj, indent=2) + "\n")
    return path


def test_reader_on_public_format_sample(tmp_path):
    path = _write_sample(tmp_path)
    (conv,) = read_conversations(path)
    assert conv.image_path == "images/s1.png"
    assert [r.ref_index for r in conv.rounds] == [None, 0, 0]
    assert conv.rounds[1].ref_mask_path == "masks/s1_round_00.png"
    assert conv.rounds[1].mask_path == "masks/s1_round_01.png"  # REF-DECODE is not an output
    sample = MRMedSegDataset(tmp_path)[0]
    assert sample.image.dtype == np.float32 and sample.image.shape == (24, 20)
    assert 0.0 <= sample.image.min() and sample.image.max() <= 1.0
    assert sample.masks.dtype == bool and sample.masks.shape == (3, 24, 20)
    assert sample.masks[1].sum() == 9
    assert sample.answers == [SEG_TOKEN, f"The segmentation output is {SEG_TOKEN}",
                              f"left kidney: it lies to the patient's left of it. {SEG_TOKEN}"]
    assert sample.entities == [None, None, "left kidney"]
    assert sample.ref_indices == [None, 0, 0]
    assert collate_samples([sample]) == [sample]


def test_exact_round_trip_object_and_list(tmp_path):
    path = _write_sample(tmp_path)
    convs = read_conversations(path)
    out = write_conversations(convs, tmp_path / "again.json", single=True)
    assert out.read_text() == path.read_text()
    listed = write_conversations(convs * 2, tmp_path / "list.json")
    again = read_conversations(listed, tmp_path)
    assert write_conversations(again, tmp_path / "list2.json").read_text() == listed.read_text()
    assert list(json.loads(listed.read_text())[0]) == ["task", "base", "conversations"]


def test_edited_round_is_written_canonically_and_unknown_keys_kept(tmp_path):
    obj = json.loads(json.dumps(SAMPLE))
    obj["meta"] = {"note": "kept"}
    obj["conversations"][2]["extra_key"] = 1
    path = _write_sample(tmp_path, obj)
    convs = read_conversations(path)
    convs[0].rounds[2].answer_text = "right kidney: edited."
    data = json.loads(write_conversations(convs, tmp_path / "e.json").read_text())[0]
    assert data["meta"] == {"note": "kept"} and data["conversations"][2]["extra_key"] == 1
    assert data["conversations"][5]["value"] == ("right kidney: edited. [REF-DECODE:masks/s1_round_00.png]"
                                                 "[MASK-DECODE:masks/s1_round_02.png].")
    assert data["conversations"][3] == SAMPLE["conversations"][3]


def _broken(tmp_path, edit, **kw):
    obj = json.loads(json.dumps(SAMPLE))
    edit(obj["conversations"])
    return _write_sample(tmp_path, [SAMPLE, obj], **kw)


@pytest.mark.parametrize("edit, message", [
    (lambda c: c[4].__setitem__("ind", 2), "'ind' 2 must point to an earlier round"),
    (lambda c: c[4].__setitem__("ind", 7), "'ind' 7 must point to an earlier round"),
    (lambda c: c[4].__setitem__("ind", -1), "must point to an earlier round"),
    (lambda c: c[1].__setitem__("value", "[MASK-DECODE masks/s1_round_00.png]."), "malformed tag"),
    (lambda c: c[1].__setitem__("value", "[MASK_DECODE:masks/s1_round_00.png]."), "unknown tag kind"),
    (lambda c: c[0].__setitem__("value", "Segment it."), "IMAGE256"),
    (lambda c: c[3].__setitem__("value", "Done."), "needs [MASK-DECODE"),
    (lambda c: c[5].__setitem__("value", "[MASK-DECODE:masks/missing.png]."), "mask file 'masks/missing.png' not found"),
    (lambda c: c[4].pop("ind"), "MASK-ENCODE without 'ind'"),
    (lambda c: c.pop(), "must come in pairs"),
])
def test_validation_errors_name_file_conversation_and_turn(tmp_path, edit, message):
    path = _broken(tmp_path, edit)
    with pytest.raises(DatasetError) as info:
        read_conversations(path)
    text = str(info.value)
    assert message in text and str(path) in text and "conversation 1" in text


def test_size_mismatch_and_missing_image(tmp_path):
    path = _write_sample(tmp_path, mask_size=(12, 20))
    with pytest.raises(DatasetError, match=r"conversation 0, turn 1: mask 'masks/s1_round_00.png' is 20x12"):
        read_conversations(path)
    (tmp_path / "images/s1.png").unlink()
    with pytest.raises(DatasetError, match="image file 'images/s1.png' not found"):
        read_conversations(path)
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(DatasetError, match="not valid JSON"):
        read_conversations(tmp_path / "bad.json")
