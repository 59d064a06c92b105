"""Tokenizers: our byte-level BPE for MediRound-Tiny (trained on the dialogue corpus, shipped with the
weights), or LLaVA-Med's Mistral tokenizer for the full model; both gain `[SEG]`, `<crop>`, `<box>`, `<image>`."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

from ..errors import CheckpointError
from .config import SPECIAL_TOKENS

BASE_SPECIALS = {"pad_token": "<pad>", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}


@dataclass(frozen=True)
class TokenIds:
    seg: int
    crop: int
    box: int
    image: int
    bos: int
    eos: int
    pad: int

    @classmethod
    def from_tokenizer(cls, tokenizer) -> "TokenIds":
        ids = {name: tokenizer.convert_tokens_to_ids(tok) for name, tok in SPECIAL_TOKENS.items()}
        unk = tokenizer.unk_token_id
        for name, value in ids.items():
            if value is None or value == unk:
                raise CheckpointError(f"tokenizer lacks the special token {SPECIAL_TOKENS[name]!r}")
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        return cls(bos=tokenizer.bos_token_id, eos=tokenizer.eos_token_id, pad=pad, **ids)


def add_mediround_tokens(tokenizer) -> int:
    """Add `[SEG]`, `<crop>`, `<box>`, `<image>` (and a pad token if missing); returns how many were new."""
    added = tokenizer.add_special_tokens({"additional_special_tokens": list(SPECIAL_TOKENS.values())})
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.unk_token or tokenizer.eos_token
    return added


def train_tiny_tokenizer(corpus: Iterable[str], vocab_size: int = 1024):
    """A byte-level BPE trained on our dialogue text: any input string encodes, nothing is unknown."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = list(BASE_SPECIALS.values()) + list(SPECIAL_TOKENS.values())
    core = Tokenizer(models.BPE(unk_token=BASE_SPECIALS["unk_token"]))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    core.train_from_iterator((text.lower() for text in corpus), trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, **BASE_SPECIALS)
    add_mediround_tokens(tokenizer)
    return tokenizer


def load_tokenizer(folder: str | Path):
    """Load a tokenizer from a local folder (never from a hub) and make sure it has our tokens."""
    from transformers import AutoTokenizer

    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError(f"{folder}: tokenizer folder not found")
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(folder), local_files_only=True, trust_remote_code=False)
    except Exception as exc:  # transformers raises many types for unreadable folders
        tokenizer = _fast_tokenizer_from_file(folder)
        if tokenizer is None:
            raise CheckpointError(f"{folder}: cannot load tokenizer ({exc})") from None
    add_mediround_tokens(tokenizer)
    return tokenizer


def _fast_tokenizer_from_file(folder: Path):
    """The folder's tokenizer.json as a PreTrainedTokenizerFast, with the special tokens its config names; for
    a folder written by transformers 5 (`tokenizer_class: TokenizersBackend`, a list of extra special tokens)
    read by transformers 4.x, whose AutoTokenizer knows neither. None without a tokenizer.json."""
    import json

    from transformers import PreTrainedTokenizerFast

    if not (folder / "tokenizer.json").is_file():
        return None
    try:
        config = json.loads((folder / "tokenizer_config.json").read_text())
    except (OSError, ValueError):
        config = {}
    specials = {k: config[k] if isinstance(config.get(k), str) else v for k, v in BASE_SPECIALS.items()}
    try:
        return PreTrainedTokenizerFast(tokenizer_file=str(folder / "tokenizer.json"), **specials)
    except Exception as exc:
        raise CheckpointError(f"{folder}: cannot load tokenizer.json ({exc})") from None
