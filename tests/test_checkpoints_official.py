"""The official MediRound checkpoint (consolidated state dict of the peft-wrapped LISA-style model)."""

import re

import pytest
import torch

from fixtures_checkpoints import llava_tensors, llava_tiny_config, medsam_tensors, official_tensors, tiny_model, write_llava_med
from MediRoundCore.checkpoints._common import own_tensors, vision_prefix
from MediRoundCore.checkpoints.llava_med import load_llava_med
from MediRoundCore.checkpoints.medsam import load_medsam
from MediRoundCore.checkpoints.official import load_official
from MediRoundCore.errors import CheckpointError

BASE = 96
P = "base_model.model."
MODULES = [("model.text_hidden_fcs.0.", "seg_projection."), ("model.bbox_encoder.", "box_encoder."),
           ("model.visual_model.", "segmenter."), ("model.mask_quality_MLP.", "jcm.quality."),
           ("model.refine_MLP.", "jcm.correction."), ("model.mm_projector.", "mm_projector.")]


@pytest.fixture(scope="module")
def official(tmp_path_factory):
    tensors = official_tensors(BASE)
    path = tmp_path_factory.mktemp("official") / "pytorch_model.bin"
    torch.save(tensors, path)
    return path, tensors


def ours_for(key, own):
    short = key[len(P):].replace(".base_layer.", ".")
    if short.startswith("model.vision_tower.vision_tower.vision_model."):
        return vision_prefix(own) + short[len("model.vision_tower.vision_tower.vision_model."):]
    for theirs, ours in MODULES:
        if short.startswith(theirs):
            return ours + short[len(theirs):]
    return "language_model." + short


def test_values_land_and_rows_map(official):
    path, tensors = official
    model = tiny_model(BASE)
    report = load_official(path, model)
    assert model.config.jcm.trained is True  # the checkpoint's JCM, trained with it
    own, _ = own_tensors(model)
    ids = model.token_ids
    for key, value in tensors.items():
        if ".lora_" in key or re.search(r"\.(q_proj|v_proj)\.weight$", key):
            continue  # merged: checked below
        ours = own[ours_for(key, own)]
        if key.endswith(("embed_tokens.weight", "lm_head.weight")):
            assert torch.equal(ours[:BASE], value[:BASE])
            assert torch.equal(ours[ids.seg], value[BASE])  # [SEG]
            assert torch.equal(ours[ids.box], value[BASE + 1])  # [BBOXINPUT]
            assert torch.equal(ours[ids.crop], value[BASE + 2])  # [CROPPEDIMAGE]
        else:
            assert torch.equal(ours, value), key
    for layer in range(2):
        for proj in ("q_proj", "v_proj"):
            k = f"{P}model.layers.{layer}.self_attn.{proj}"
            expected = tensors[k + ".weight"] + 2.0 * tensors[k + ".lora_B.default.weight"] @ tensors[k + ".lora_A.default.weight"]
            assert torch.allclose(own[f"language_model.model.layers.{layer}.self_attn.{proj}.weight"], expected, atol=1e-6)
    assert any("LoRA on 4 layers" in n for n in report.notes)


def _reference_peft_lm(tensors):
    """The official language model as the public code runs it: Mistral + peft LoRA(r 8, alpha 16, q/v)."""
    from peft import LoraConfig, get_peft_model
    from transformers import MistralConfig, MistralForCausalLM

    from fixtures_checkpoints import small_config

    t = small_config(BASE + 3).text
    cfg = MistralConfig(vocab_size=BASE + 3, hidden_size=t.hidden_size, intermediate_size=t.intermediate_size,
                        num_hidden_layers=t.num_hidden_layers, num_attention_heads=t.num_attention_heads,
                        num_key_value_heads=t.num_key_value_heads, max_position_embeddings=t.max_position_embeddings,
                        rms_norm_eps=t.rms_norm_eps,
                        rope_parameters={"rope_type": "default", "rope_theta": t.rope_theta}, tie_word_embeddings=False)
    lm = get_peft_model(MistralForCausalLM(cfg), LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"],
                                                           lora_dropout=0.05, bias="none", task_type="CAUSAL_LM"))
    state = {}
    for key, value in tensors.items():
        short = key[len(P):]
        if short.startswith(("model.vision_tower", "model.mm_projector", "model.text_hidden_fcs", "model.bbox_encoder",
                             "model.visual_model", "model.mask_quality_MLP", "model.refine_MLP")):
            continue
        state[P + re.sub(r"\.(q_proj|v_proj)\.weight$", r".\1.base_layer.weight", short)] = value
    missing, unexpected = lm.load_state_dict(state, strict=False)
    assert not unexpected and not [k for k in missing if "inv_freq" not in k]
    return lm.eval()


def test_lora_merge_matches_peft_forward(official):
    path, tensors = official
    reference = _reference_peft_lm(tensors)
    merged = tiny_model(BASE)
    load_official(path, merged, lora="merge")
    adapters = tiny_model(BASE)
    load_official(path, adapters, lora="peft")
    adapters.eval()
    from MediRoundCore.model.lora import has_lora

    assert has_lora(adapters) and not has_lora(merged)
    ids = merged.token_ids
    seq = torch.tensor([[1, 17, 42, 5, BASE, 60, BASE + 1, BASE + 2, 3]])  # BASE.. = official [SEG],[BBOXINPUT],[CROPPEDIMAGE]
    ours_seq = seq.clone()
    for j, our_id in enumerate((ids.seg, ids.box, ids.crop)):
        ours_seq[seq == BASE + j] = our_id
    with torch.no_grad():
        ref = reference(input_ids=seq).logits
        a = merged.language_model(input_ids=ours_seq).logits
        b = adapters.language_model(input_ids=ours_seq).logits
    cols = list(range(BASE)) + [ids.seg, ids.box, ids.crop]
    assert torch.allclose(a[..., cols], ref, atol=1e-5), (a[..., cols] - ref).abs().max()
    assert torch.allclose(b[..., cols], ref, atol=1e-5)
    # the LoRA contribution is not negligible: without it the logits differ
    base_only = tiny_model(BASE)
    no_lora = {k: v for k, v in tensors.items() if ".lora_" not in k}
    torch.save(no_lora, path.parent / "no_lora.bin")
    load_official(path.parent / "no_lora.bin", base_only)
    with torch.no_grad():
        c = base_only.language_model(input_ids=ours_seq).logits
    assert not torch.allclose(c[..., cols], ref, atol=1e-4)


def test_trainable_only_stage1_checkpoint_keeps_base_weights(official, tmp_path):
    _, tensors = official
    frozen = ("model.vision_tower.", "model.mm_projector.", "model.visual_model.image_encoder.",
              "model.visual_model.prompt_encoder.", "model.mask_quality_MLP.", "model.refine_MLP.")
    trainable = {k: v for k, v in tensors.items()
                 if not k[len(P):].startswith(frozen)
                 and not (k[len(P):].startswith("model.layers.") and ".lora_" not in k)
                 and not k.endswith("model.norm.weight")}
    torch.save(trainable, tmp_path / "stage1.bin")
    model = tiny_model(BASE)
    lt = llava_tensors(BASE)
    load_llava_med(write_llava_med(tmp_path / "llava", lt, llava_tiny_config(BASE)), model)
    st = medsam_tensors()
    torch.save(st, tmp_path / "medsam.pth")
    load_medsam(tmp_path / "medsam.pth", model)
    own, _ = own_tensors(model)
    jcm_before = own["jcm.quality.fc1.weight"].clone()
    report = load_official(tmp_path / "stage1.bin", model)
    own, _ = own_tensors(model)
    # frozen parts: LLaVA-Med / MedSAM values stay; trained parts: the official ones
    assert torch.equal(own["language_model.model.layers.1.mlp.down_proj.weight"], lt["model.layers.1.mlp.down_proj.weight"].float())
    assert torch.equal(own["segmenter.image_encoder.pos_embed"], st["image_encoder.pos_embed"])
    assert torch.equal(own["segmenter.mask_decoder.iou_token.weight"], tensors[P + "model.visual_model.mask_decoder.iou_token.weight"])
    assert torch.equal(own["box_encoder.weight"], tensors[P + "model.bbox_encoder.weight"])
    assert torch.equal(own["jcm.quality.fc1.weight"], jcm_before)
    k = f"{P}model.layers.0.self_attn.q_proj"
    expected = lt["model.layers.0.self_attn.q_proj.weight"].float() + 2.0 * tensors[k + ".lora_B.default.weight"] @ tensors[k + ".lora_A.default.weight"]
    assert torch.allclose(own["language_model.model.layers.0.self_attn.q_proj.weight"], expected, atol=1e-6)
    assert any(n.startswith("jcm:") for n in report.notes)
    assert model.config.jcm.trained is False and not model.jcm_usable  # a stage-1 checkpoint's JCM is not applied
    with pytest.raises(CheckpointError, match="missing key"):
        load_official(tmp_path / "stage1.bin", tiny_model(BASE), require_complete=True)


def test_peft_07_names_and_folder_of_bins(tmp_path):
    tensors = official_tensors(BASE, base_layer=True)
    assert any(".q_proj.base_layer.weight" in k for k in tensors)
    keys = sorted(tensors)
    torch.save({k: tensors[k] for k in keys[::2]}, tmp_path / "part1.bin")
    torch.save({k: tensors[k] for k in keys[1::2]}, tmp_path / "part2.bin")
    model = tiny_model(BASE)
    load_official(tmp_path, model)
    own, _ = own_tensors(model)
    assert torch.equal(own["language_model.model.layers.1.mlp.up_proj.weight"], tensors[P + "model.layers.1.mlp.up_proj.weight"])
    (tmp_path / "deepspeed_only").mkdir()
    with pytest.raises(CheckpointError, match="zero_to_fp32"):
        load_official(tmp_path / "deepspeed_only", model)


def test_errors_name_the_key(official, tmp_path):
    _, tensors = official
    model = tiny_model(BASE)
    before = own_tensors(model)[0]["box_encoder.weight"].clone()

    def check(name, state, pattern):
        torch.save(state, tmp_path / name)
        with pytest.raises(CheckpointError, match=pattern):
            load_official(tmp_path / name, model)

    partial = {k: v for k, v in tensors.items() if k != P + "model.refine_MLP.fc2.bias"}
    check("partial.bin", partial, r"missing key 'base_model\.model\.model\.refine_MLP\.fc2\.bias'")
    no_b = {k: v for k, v in tensors.items() if k != P + "model.layers.1.self_attn.v_proj.lora_B.default.weight"}
    check("no_b.bin", no_b, r"missing key 'base_model\.model\.model\.layers\.1\.self_attn\.v_proj\.lora_B\.default\.weight'")
    check("extra.bin", dict(tensors, **{P + "model.bbox_decoder.layers.0.weight": torch.zeros(2)}),
          r"unexpected key 'base_model\.model\.model\.bbox_decoder\.layers\.0\.weight'")
    check("unwrapped.bin", dict(tensors, **{"model.norm.weight": torch.zeros(64)}), r"unexpected key 'model\.norm\.weight'")
    check("shape.bin", dict(tensors, **{P + "model.bbox_encoder.weight": torch.zeros(4096, 4)}),
          r"shape mismatch for 'base_model\.model\.model\.bbox_encoder\.weight'.*\(4096, 4\)")
    bad_a = dict(tensors, **{P + "model.layers.0.self_attn.q_proj.lora_A.default.weight": torch.zeros(8, 65)})
    check("lora_shape.bin", bad_a, r"shape mismatch for 'base_model\.model\.model\.layers\.0\.self_attn\.q_proj\.lora_A")
    vocab = dict(tensors, **{P + "model.embed_tokens.weight": torch.zeros(BASE + 5, 64)})
    check("vocab.bin", vocab, r"embed_tokens\.weight.*\[SEG\]")
    assert torch.equal(own_tensors(model)[0]["box_encoder.weight"], before)


def test_peft_mode_checks_before_wrapping(official):
    from MediRoundCore.model.lora import apply_lora, has_lora

    path, _ = official
    model = tiny_model(BASE)
    model.config.lora_rank = 4
    with pytest.raises(CheckpointError, match="LoRA rank"):
        load_official(path, model, lora="peft")
    assert not has_lora(model)
    wrapped = apply_lora(tiny_model(BASE))
    with pytest.raises(CheckpointError, match="lora='merge'"):
        load_official(path, wrapped, lora="merge")
