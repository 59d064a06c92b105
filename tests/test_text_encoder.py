"""all-MiniLM-L6-v2 through our loader: strict keys, pinned hashes, and (with the pinned weights present) real
sentence-embedding behaviour: paraphrases of a request lie closer than unrelated requests."""

import json

import pytest
import torch

from MediRoundCore.checkpoints import base_weights
from MediRoundCore.errors import CheckpointError
from MediRoundCore.model.text_encoder import load_minilm


def _small_folder(folder, drop: str | None = None, extra: dict | None = None):
    """A BERT folder in MiniLM's file layout at a tiny width, with a WordPiece tokenizer.json."""
    from safetensors.torch import save_file
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import BertConfig, BertModel

    vocab = {t: i for i, t in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "segment", "the", "liver",
                                         "kidney", "left", "."])}
    core = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]"))
    core.normalizer = normalizers.BertNormalizer(lowercase=True)
    core.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    core.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]",
                                                        special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    core.save(str(folder / "tokenizer.json"))
    config = dict(model_type="bert", vocab_size=len(vocab), hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                  intermediate_size=32, max_position_embeddings=64, type_vocab_size=2)
    (folder / "config.json").write_text(json.dumps(config))
    torch.manual_seed(0)
    state = {k: v.contiguous() for k, v in BertModel(BertConfig(**config), add_pooling_layer=True).state_dict().items()}
    if drop:
        state.pop(drop)
    state.update(extra or {})
    save_file(state, str(folder / "model.safetensors"))
    return folder


def test_small_folder_loads_strictly_and_pools_over_real_tokens(tmp_path):
    enc = load_minilm(_small_folder(tmp_path), check_hash=False)
    assert enc.tokenizer("Segment the LIVER.")["input_ids"] == [2, 5, 6, 7, 10, 3]
    with torch.inference_mode():
        alone = enc.encode(["segment the liver ."])
        padded = enc.encode(["segment the liver .", "segment the left kidney . the kidney the left kidney ."])
    assert torch.allclose(alone[0], padded[0], atol=1e-5)  # padding does not leak into the mean
    assert torch.allclose(padded.norm(dim=-1), torch.ones(2), atol=1e-5)


def test_errors_name_file_and_key(tmp_path):
    (tmp_path / "a").mkdir()
    _small_folder(tmp_path / "a", drop="encoder.layer.0.attention.self.query.weight")
    missing = r"a/model.safetensors: missing key 'encoder\.layer\.0\.attention\.self\.query\.weight'"
    with pytest.raises(CheckpointError, match=missing):
        load_minilm(tmp_path / "a", check_hash=False)
    (tmp_path / "b").mkdir()
    _small_folder(tmp_path / "b", extra={"encoder.layer.1.output.dense.weight": torch.zeros(16, 32)})
    with pytest.raises(CheckpointError, match=r"unexpected key 'encoder\.layer\.1\.output\.dense\.weight'"):
        load_minilm(tmp_path / "b", check_hash=False)
    # by default a folder must hold the published files
    with pytest.raises(CheckpointError, match=r"sha256 [0-9a-f]{64} differs from the pinned"):
        load_minilm(tmp_path / "a")


@pytest.fixture(scope="module")
def minilm():
    try:
        base_weights.locate("minilm")
    except CheckpointError:
        pytest.skip("MiniLM weights not on this machine: python -m MediRoundCore.checkpoints.base_weights fetch")
    return load_minilm()


def test_real_minilm_paraphrases_are_closer(minilm):
    groups = [
        ["Segment the left kidney.", "Outline the kidney on the patient's left side.",
         "Show me the left kidney please."],
        ["Go back to the first structure.", "Return to the structure from the first round."],
        ["Where is the liver?", "Highlight the liver."],
    ]
    unrelated = "The weather is sunny today."
    texts = [t for g in groups for t in g] + [unrelated]
    with torch.inference_mode():
        emb = minilm.encode(texts)
    sim = emb @ emb.T
    assert minilm.hidden_size == 384 and emb.shape == (len(texts), 384)
    starts = [0, 3, 5, 7]
    for g, (a, b) in enumerate(zip(starts, starts[1:])):
        inside = [float(sim[i, j]) for i in range(a, b) for j in range(a, b) if i < j]
        across = [float(sim[i, j]) for i in range(a, b) for j in range(len(texts)) if not a <= j < b]
        assert min(inside) > max(across) + 0.1, (texts[a], inside, max(across))
    assert float(sim[:-1, -1].max()) < 0.2  # the weather sentence is unrelated to every request


def test_built_in_architecture_is_the_files(minilm):
    """A lite model builds its query encoder before the weights arrive: from MINILM_CONFIG, which must be
    the pinned config.json's architecture."""
    from MediRoundCore.model.text_encoder import MINILM_CONFIG

    data = json.loads((minilm.folder / "config.json").read_text())
    assert {k: data[k] for k in MINILM_CONFIG} == MINILM_CONFIG
