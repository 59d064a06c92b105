"""MediRound-Lite (`lite_config`): the default model's parts from pinned pretrained weights.

  segmenter        LiteMedSAM (`checkpoints/lite_medsam.py`): TinyViT encoder and prompt encoder frozen (filled
                   from the pinned package on every load, never stored by us), mask decoder trained from it
  tokenizer        all-MiniLM-L6-v2's WordPiece (30,522 words, lower-cased) + [SEG], <crop>, <box>, <image>;
                   [CLS]/[SEP]/[PAD] serve as BOS/EOS/PAD
  language model   a 4 × 384 Mistral decoder; its (tied) word embeddings start from MiniLM's, our four tokens
                   from their mean; each query's tokens also get the frozen MiniLM encoder's contextual states
                   of the query (through a zero-initialised projection: `MediRound.query_states`)
  vision tower,    as the tiny preset (trained by us)
  projector, box encoder, [SEG] projection, JCM

`build_lite()` makes the untrained starting point; `MediRound.from_pretrained` of a lite checkpoint fills the
base parts the same way (`load_base_weights`) before reading the stored (trained) tensors.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..errors import CheckpointError
from .config import MINILM_VOCAB, MediRoundConfig, lite_config
from .tokenizer import TokenIds, add_mediround_tokens


def lite_tokenizer(minilm_folder: str | Path | None = None):
    """MiniLM's WordPiece tokenizer with our four tokens (ids 30522..30525)."""
    from ..checkpoints import base_weights
    from .text_encoder import load_tokenizer

    folder = base_weights.locate("minilm", minilm_folder)
    tokenizer = load_tokenizer(folder)
    tokenizer.bos_token, tokenizer.eos_token = "[CLS]", "[SEP]"
    add_mediround_tokens(tokenizer)
    if len(tokenizer) != MINILM_VOCAB + 4:
        raise CheckpointError(f"{folder / 'tokenizer.json'}: expected {MINILM_VOCAB} words, got "
                              f"{len(tokenizer) - 4}")
    return tokenizer


def load_base_weights(model, lite_medsam_path: str | Path | None = None, minilm_folder=None) -> None:
    """Fill the parts `config.base_weights` names from the pinned packages, and freeze them."""
    from ..checkpoints.lite_medsam import load_lite_medsam

    from ..checkpoints import base_weights
    from .text_encoder import load_minilm_weights

    names = set(model.config.base_weights.values())
    unknown = names - {"lite_medsam", "minilm"}
    if unknown:
        raise CheckpointError(f"config names unknown base weights {sorted(unknown)}")
    if "lite_medsam" in names:
        load_lite_medsam(model, lite_medsam_path)
    if "minilm" in names:
        if model.query_encoder is None:
            raise CheckpointError("config names minilm base weights but has no query encoder")
        load_minilm_weights(model.query_encoder, base_weights.locate("minilm", minilm_folder) / "model.safetensors")
        model.query_encoder.eval()
    prefixes = tuple(model.config.base_weights)
    for name, param in model.named_parameters():
        if name.startswith(prefixes):
            param.requires_grad_(False)


def initial_word_embeddings(extra: int = 4, minilm_folder: str | Path | None = None) -> torch.Tensor:
    """(30522 + extra, 384): MiniLM's word embeddings, then `extra` rows (our tokens) of their mean: where the
    language model's word embeddings start (also the base a training snapshot stores them against)."""
    from ..checkpoints import base_weights
    from ..checkpoints.safety import load_tensors

    path = base_weights.locate("minilm", minilm_folder) / "model.safetensors"
    words = load_tensors(path)["embeddings.word_embeddings.weight"]
    if words.shape[0] != MINILM_VOCAB:
        raise CheckpointError(f"{path}: expected {MINILM_VOCAB} word embeddings, got {tuple(words.shape)}")
    return torch.cat([words, words.mean(0, keepdim=True).expand(extra, -1)])


def init_word_embeddings(model, minilm_folder: str | Path | None = None) -> None:
    """Rows 0..30521 of the language model's word embeddings ← MiniLM's; our four tokens ← their mean."""
    embed = model.language_model.get_input_embeddings().weight
    start = initial_word_embeddings(embed.shape[0] - MINILM_VOCAB, minilm_folder)
    if start.shape != embed.shape:
        raise CheckpointError(f"MiniLM's word embeddings {tuple(start.shape)} do not fit the language model's "
                              f"{tuple(embed.shape)}")
    with torch.no_grad():
        embed.copy_(start.to(embed.dtype))


def build_lite(config: MediRoundConfig | None = None, lite_medsam_path=None, minilm_folder=None, seed: int = 0):
    """(model, tokenizer): MediRound-Lite before our training, from the pinned base weights."""
    from .modeling import MediRound

    tokenizer = lite_tokenizer(minilm_folder)
    config = config or lite_config(len(tokenizer))
    torch.manual_seed(seed)
    model = MediRound(config, TokenIds.from_tokenizer(tokenizer))
    load_base_weights(model, lite_medsam_path, minilm_folder)
    init_word_embeddings(model, minilm_folder)
    return model, tokenizer
