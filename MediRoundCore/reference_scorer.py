"""A learned chooser of the earlier round that "it" means, for queries that name no round.

"Mark the kidney of similar density to it." after rounds (vertebra, spinal canal, aorta, left renal pelvis,
right kidney, right renal pelvis) means round 5, not the previous round: a kidney is similar to a kidney. The
rules (`references.named_round`) catch rounds named by number, ordinal or entity; what is left is which earlier
structure the query's relation fits. `ReferenceScorer` scores each earlier round by a linear model over hashed
features (`features`): the query's words and word pairs crossed with the candidate's entity words, and how many
rounds back the candidate is, crossed with the query's words. It is trained on generated dialogues
(`python -m MediRoundCore.train.reference_scorer`), stored beside a model's weights (`reference_scorer.*`) and
read with numpy only, so the Slicer panel and the server resolve as the engine does.
"""

from __future__ import annotations

import json
import re
import zlib
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from .errors import CheckpointError

WEIGHTS_FILE = "reference_scorer.safetensors"
CONFIG_FILE = "reference_scorer.json"
_WORD = re.compile(r"[a-z0-9]+")
_SIDES = {"left", "right"}


@dataclass
class ReferenceScorerConfig:
    buckets: int = 1 << 18  # hashed feature space
    max_back: int = 8  # distances beyond this share one feature
    version: int = 1


def _words(text: str | None) -> list[str]:
    return _WORD.findall((text or "").lower())


def query_terms(query: str) -> list[str]:
    """The query's words and adjacent word pairs."""
    words = _words(query)
    return words + [f"{a}_{b}" for a, b in zip(words, words[1:])]


def features(query_terms_: Sequence[str], entities: Sequence[str | None], candidate: int, cfg) -> list[str]:
    """Feature names of earlier round `candidate` (0-based) as the reference of the next round."""
    back = min(len(entities) - 1 - candidate, cfg.max_back)
    entity_words = _words(entities[candidate]) or ["none"]
    out = [f"back={back}", f"entity={' '.join(entity_words)}"]
    for term in query_terms_:
        out.append(f"back={back}|{term}")
        out += [f"{term}|{w}" for w in entity_words]
    later = {w for e in entities[candidate + 1:] for w in _words(e)}
    out += [f"later|{w}" for w in entity_words if w in later]  # its name came up again after it
    side = next((w for w in entity_words if w in _SIDES), None)
    if side is not None:  # words the query shares with another round on the candidate's side: done already?
        words = set(query_terms_)
        for i, e in enumerate(entities):
            other = _words(e)
            if i != candidate and side in other:
                out += [f"sameside|{w}" for w in other if w in words and w not in _SIDES]
    return out


def best_round(scores: np.ndarray, referable: Sequence[bool] | None = None) -> int | None:
    """The best-scoring round (1-based) among the referable ones (default all), or None when there is none."""
    scores = np.asarray(scores, np.float64).copy()
    if referable is not None:
        scores[~np.asarray(referable, bool)] = -np.inf
    return int(np.argmax(scores)) + 1 if np.isfinite(scores).any() else None


def bucket_ids(names: Sequence[str], buckets: int) -> np.ndarray:
    return np.fromiter((zlib.crc32(n.encode()) % buckets for n in names), dtype=np.int64, count=len(names))


class ReferenceScorer:
    """Linear scores over hashed features; `choose` returns the best earlier round (1-based)."""

    def __init__(self, config: ReferenceScorerConfig | None = None, weights: np.ndarray | None = None):
        self.config = config or ReferenceScorerConfig()
        self.weights = np.zeros(self.config.buckets, np.float32) if weights is None else weights
        if self.weights.shape != (self.config.buckets,):
            raise CheckpointError(f"reference scorer weights of shape {self.weights.shape} do not fit "
                                  f"{self.config.buckets} buckets")

    def candidate_ids(self, query: str, entities: Sequence[str | None]) -> list[np.ndarray]:
        terms = query_terms(query)
        return [bucket_ids(features(terms, entities, j, self.config), self.config.buckets)
                for j in range(len(entities))]

    def scores(self, query: str, entities: Sequence[str | None]) -> np.ndarray:
        return np.array([self.weights[ids].sum() for ids in self.candidate_ids(query, entities)], np.float32)

    def choose(self, query: str, entities: Sequence[str | None], referable: Sequence[bool] | None = None) -> int | None:
        """The best-scoring round (1-based) among the referable ones (default all), or None when there is none."""
        return best_round(self.scores(query, entities), referable) if entities else None

    def save_pretrained(self, folder: str | Path) -> None:
        from safetensors.numpy import save_file

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        save_file({"weights": self.weights.astype(np.float16)}, str(folder / WEIGHTS_FILE))
        (folder / CONFIG_FILE).write_text(json.dumps(asdict(self.config), indent=2) + "\n")

    @classmethod
    def from_pretrained(cls, folder: str | Path) -> "ReferenceScorer | None":
        """The scorer stored in a model folder, or None when it has none."""
        from safetensors import SafetensorError
        from safetensors.numpy import load_file

        folder = Path(folder)
        if not (folder / CONFIG_FILE).is_file():
            return None
        try:
            config = ReferenceScorerConfig(**json.loads((folder / CONFIG_FILE).read_text()))
            weights = load_file(str(folder / WEIGHTS_FILE))["weights"].astype(np.float32)
        except (OSError, ValueError, TypeError, KeyError, SafetensorError) as exc:
            raise CheckpointError(f"{folder}: unreadable reference scorer ({exc})") from exc
        if not np.isfinite(weights).all():
            raise CheckpointError(f"{folder / WEIGHTS_FILE}: reference scorer weights are not finite")
        return cls(config, weights)


class ScorerWithEvidence:
    """A reference scorer's scores plus a log-evidence per earlier round from outside the text: the image's
    (lesion_finder.py: how likely the round's mask holds the lesion asked for). Its scores are the log of the
    scorer's softmax probability times the evidence, up to a constant, so every reader of scores (the guess,
    the guesses tried after it, the close alternatives) ranks by that product."""

    def __init__(self, scorer, log_evidence: np.ndarray):
        self.scorer = scorer
        self.log_evidence = np.asarray(log_evidence, np.float64)

    def scores(self, query: str, entities: Sequence[str | None]) -> np.ndarray:
        base = self.scorer.scores(query, entities)
        if len(base) != len(self.log_evidence):
            raise ValueError(f"{len(self.log_evidence)} evidence values for {len(base)} rounds")
        return (base + self.log_evidence).astype(np.float32)

    def choose(self, query: str, entities: Sequence[str | None], referable: Sequence[bool] | None = None) -> int | None:
        """The round (1-based) with the best score and evidence among the referable ones, or None."""
        return best_round(self.scores(query, entities), referable) if entities else None
