"""The MediRound model: config, tokenizer, processing, modules and JCM."""

from .config import MediRoundConfig, full_config, tiny_config
from .jcm import JudgmentCorrection
from .modeling import MediRound
from .tokenizer import TokenIds

__all__ = ["MediRound", "MediRoundConfig", "JudgmentCorrection", "TokenIds", "full_config", "tiny_config"]
