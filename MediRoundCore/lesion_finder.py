"""Where the slice holds a lesion: a small per-cell head on the segmenter's image embedding.

"Now the nodule within it" after both lungs names no round; the text cannot say which lung, the image can.
The language model's own answer did not learn it (three fine-tunes, docs/design-notes.md), nor do the mask
decoder's outputs (it draws a lesion-shaped mask inside whatever organ it is given). `LesionFinder` is trained for
that question alone: on each cell of the frozen segmenter embedding (LiteMedSAM: 256 channels on a 64×64 grid) it
gives the probability of each lesion kind (`LESION_KINDS`) or none. `presence` reads it over an earlier round's
mask: the likeliest cell of the kinds the query asks for (`lesion_kinds_asked`); `spots` counts the separate
lesions there, since "the larger nodule" means an organ with two and "the nodule" one with one
(`lesion_named_by_size`). The engine multiplies the reference scorer's probability of each earlier round by
them (`reference_scorer.ScorerWithEvidence`). Trained on the cached training-pool embeddings with the
generator's label maps (`python -m MediRoundCore.train.lesion_finder`); stored beside a model's weights
(`lesion_finder.*`).
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from .errors import CheckpointError

WEIGHTS_FILE = "lesion_finder.safetensors"
CONFIG_FILE = "lesion_finder.json"
LESION_KINDS = ("lesion", "cyst", "nodule", "tumour")  # the generator's lesion nouns (data/scene.py)
SOLID_KINDS = ("lesion", "nodule", "tumour")  # what "a lesion", "an abnormality" means: a cyst is asked for by name
# Query words that ask for a lesion and the kinds each one means: the training grammar's nouns and their
# variants (data/paraphrase.NOUN_VARIANTS) and the usual clinical words.
_KIND_WORDS = {
    **dict.fromkeys(("cyst", "cysts", "cystic"), ("cyst",)),
    **dict.fromkeys(("nodule", "nodules"), ("nodule",)),
    **dict.fromkeys(("tumour", "tumor", "tumours", "tumors", "neoplasm", "neoplasms"), ("tumour",)),
    **dict.fromkeys(("lesion", "lesions", "abnormality", "abnormalities", "spot", "spots", "mass", "masses", "growth",
                     "finding", "findings", "metastasis", "metastases", "carcinoma", "cancer", "lump"), SOLID_KINDS),
}
_NOT_A_LESION = frozenset({("growth", "plate"), ("mass", "effect"), ("muscle", "mass")})  # word pairs
# Words that relate the asked structure to the round otherwise than holding it ("the nodule in front of it",
# "the cyst larger than it", "the mass of the same density"): then the round need not hold the lesion.
_NOT_INSIDE = frozenset("""left right anterior posterior anteriorly posteriorly front behind ventral dorsal forward
    above below over under beneath underneath beside bordering alongside near neighbouring neighboring adjacent
    abutting touching sided side lateral medial superior inferior around outside beyond between toward towards
    than same similar""".split())
_NOT_INSIDE_PAIRS = frozenset({("next", "to"), ("close", "to"), ("on", "top"), ("back", "of"), ("the", "back"),
                               ("up", "from"), ("down", "from"), ("moving", "from"), ("away", "from")})
_WORD = re.compile(r"[a-z]+")
SPOT_P, SPOT_CELLS = 0.7, 2  # a lesion spot: at least this many touching cells each above this probability
COUNT_MISMATCH = 0.3  # a round's weight factor where the finder sees no lesion surely (no cell above SPOT_P) or
# the number of lesions it sees does not fit the query's wording
UNCOUNTED_KINDS = ("tumour",)  # large, core and oedema: the finder sees one as several spots (design notes)


def _words(text: str | None) -> list[str]:
    return _WORD.findall((text or "").lower())


def _lesion_words(words: list[str]) -> list[tuple[str, ...]]:
    """The kinds each lesion word of `words` means (not in "growth plate", "mass effect", "muscle mass")."""
    out = []
    for i, w in enumerate(words):
        before, after = (words[i - 1] if i else ""), (words[i + 1] if i + 1 < len(words) else "")
        if w in _KIND_WORDS and (before, w) not in _NOT_A_LESION and (w, after) not in _NOT_A_LESION:
            out.append(_KIND_WORDS[w])
    return out


def names_a_lesion(text: str | None) -> bool:
    """Whether a text (a query, a round's entity: "nodule in the right lung") names a lesion."""
    return bool(_lesion_words(_words(text)))


def lesion_kinds_asked(query: str) -> tuple[str, ...] | None:
    """The lesion kinds a query asks for in an earlier round ("the cystic lesion in it" → ("cyst",); "the
    abnormality inside it", "the mass" → the solid kinds; "the cystic nodule" → both named), or None when it asks
    for no lesion ("the left kidney") or relates the lesion to the round otherwise than inside it ("the nodule in
    front of it")."""
    words = _words(query)
    if any(w in _NOT_INSIDE for w in words) or any(pair in _NOT_INSIDE_PAIRS for pair in zip(words, words[1:])):
        return None
    named = _lesion_words(words)
    if not named:
        return None
    specific = tuple(dict.fromkeys(k for kinds in named if kinds != SOLID_KINDS for k in kinds))
    return specific or SOLID_KINDS


LARGER_WORDS = frozenset("larger bigger largest biggest".split())  # a lesion told from its pair by its size
SMALLER_WORDS = frozenset("smaller smallest tinier tiniest".split())
_SIZE_WORDS = LARGER_WORDS | SMALLER_WORDS


def lesion_named_by_size(query: str) -> bool:
    """Whether a lesion query tells the lesion by its size ("the larger nodule inside it"): the training names
    call an organ's lesion by its kind alone when it is the only one of that kind, "larger/smaller" when there are
    two, so such a query means an organ with two."""
    return any(w in _SIZE_WORDS for w in _words(query))


def counts_tell(kinds) -> bool:
    """Whether spot counts are read for a query asking for `kinds`: not when it asks for tumours alone."""
    return not all(k in UNCOUNTED_KINDS for k in kinds)


@dataclass
class LesionFinderConfig:
    channels: int = 256  # the segmenter embedding's channels
    hidden: int = 128  # per-cell hidden width (0: a linear head)
    kinds: list[str] = field(default_factory=lambda: list(LESION_KINDS))
    encoder: str = ""  # fingerprint of the segmenter encoder it was trained on (train/embedding_cache.py)
    version: int = 1


class LesionFinder(nn.Module):
    """(B, C, g, g) segmenter embedding → (B, 1 + kinds, g, g) logits: none, then each lesion kind."""

    def __init__(self, config: LesionFinderConfig | None = None):
        super().__init__()
        self.config = config = config or LesionFinderConfig()
        out = 1 + len(config.kinds)
        if config.hidden:
            self.head = nn.Sequential(nn.Conv2d(config.channels, config.hidden, 1), nn.GELU(),
                                      nn.Conv2d(config.hidden, out, 1))
        else:
            self.head = nn.Conv2d(config.channels, out, 1)

    def forward(self, embedding: torch.Tensor) -> torch.Tensor:
        return self.head(embedding.float())

    @torch.no_grad()
    def presence(self, embedding: torch.Tensor, frame_masks: torch.Tensor, kinds=None) -> np.ndarray:
        """For each mask (N, S, S) in the segmenter frame of one slice's embedding (1, C, g, g): the largest
        probability, over the embedding cells the mask covers (half or more of the cell; any share when no cell
        is half covered), of a lesion of one of `kinds` (None: of any kind). NaN for a mask that covers no cell.
        The head runs on the CPU, wherever the embedding is."""
        return strongest_cells(self.cell_probabilities(embedding, frame_masks, kinds))

    @torch.no_grad()
    def spots(self, embedding: torch.Tensor, frame_masks: torch.Tensor, kinds=None, threshold: float = SPOT_P,
              min_cells: int = SPOT_CELLS) -> np.ndarray:
        """For each mask, as `presence` reads it: how many separate lesions of `kinds` it holds, counted as groups
        of at least `min_cells` touching cells (8-neighbours) whose probability exceeds `threshold`."""
        return count_spots(self.cell_probabilities(embedding, frame_masks, kinds), threshold, min_cells)

    @torch.no_grad()
    def cell_probabilities(self, embedding: torch.Tensor, frame_masks: torch.Tensor, kinds=None):
        """For each mask: the (n, 2) grid positions of the cells it covers, as `presence` reads them, and the
        (n,) probability of a lesion of `kinds` (None: any kind) in each."""
        if embedding.shape[0] != 1:
            raise ValueError(f"the lesion finder reads one slice's embedding, got a batch of {embedding.shape[0]}")
        if kinds is not None:
            unknown = [k for k in kinds if k not in self.config.kinds]
            if unknown or not kinds:
                raise ValueError(f"unknown lesion kind(s) {unknown or kinds!r}; expected some of {self.config.kinds}")
        cover = F.adaptive_avg_pool2d(frame_masks.float().cpu()[:, None], embedding.shape[-2:])[:, 0]  # (N, g, g)
        cells = cover >= 0.5
        thin = ~cells.flatten(1).any(1)
        cells[thin] = cover[thin] > 0
        union = cells.any(0)
        empty = (np.zeros((0, 2), int), np.zeros(0, np.float32))
        if not union.any():
            return [empty] * len(frame_masks)
        # only the cells some mask covers go through the head (a few ms for the whole grid on two cores)
        features = embedding[0].float().cpu()[:, union].T  # (n, C)
        probs = F.softmax(self(features[:, :, None, None])[:, :, 0, 0], 1)  # (n, 1+K)
        p = 1.0 - probs[:, 0] if kinds is None else probs[:, [1 + self.config.kinds.index(k) for k in kinds]].sum(1)
        where, p = union.nonzero().numpy(), p.numpy()  # row-major, as union's cells were taken
        return [(where[mine], p[mine]) for mine in cells[:, union].numpy()]

    def save_pretrained(self, folder: str | Path) -> None:
        from safetensors.torch import save_file

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        save_file({k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}, str(folder / WEIGHTS_FILE))
        (folder / CONFIG_FILE).write_text(json.dumps(asdict(self.config), indent=2) + "\n")

    @classmethod
    def from_pretrained(cls, folder: str | Path) -> "LesionFinder | None":
        """The finder stored in a model folder, or None when it has none."""
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        folder = Path(folder)
        if not (folder / CONFIG_FILE).is_file():
            return None
        try:
            config = LesionFinderConfig(**json.loads((folder / CONFIG_FILE).read_text()))
            if config.version != LesionFinderConfig.version:
                raise ValueError(f"version {config.version}; this MediRound reads version {LesionFinderConfig.version}")
            finder = cls(config)
            tensors = load_file(str(folder / WEIGHTS_FILE))
            finder.load_state_dict(tensors)
        except (OSError, ValueError, TypeError, KeyError, RuntimeError, SafetensorError) as exc:
            raise CheckpointError(f"{folder}: unreadable lesion finder ({exc})") from exc
        if not all(torch.isfinite(t).all() for t in tensors.values()):
            raise CheckpointError(f"{folder / WEIGHTS_FILE}: lesion finder weights are not finite")
        return finder.eval()


def strongest_cells(cell_probabilities) -> np.ndarray:
    """`LesionFinder.presence` from `LesionFinder.cell_probabilities`: each mask's largest cell probability
    (NaN for a mask on no cell)."""
    return np.array([float(p.max()) if len(p) else np.nan for _, p in cell_probabilities])


def container_weights(cell_probabilities, kinds, query: str, mismatch: float = COUNT_MISMATCH,
                      spot_p: float = SPOT_P, spot_cells: int = SPOT_CELLS) -> np.ndarray:
    """How likely each mask of `LesionFinder.cell_probabilities` holds the lesion `query` asks for (of `kinds`):
    its strongest cell, times `mismatch` where no cell is as sure as a spot's (a faint cell at a mask's edge is not
    a lesion seen) or the number of spots does not fit the wording (one for "the nodule", two for "the larger
    nodule"; not read for tumours). NaN for a mask on no cell."""
    seen = strongest_cells(cell_probabilities)
    fits = seen > spot_p
    if counts_tell(kinds):
        spots = count_spots(cell_probabilities, spot_p, spot_cells)
        fits &= spots >= 2 if lesion_named_by_size(query) else spots <= 1
    return seen * np.where(fits, 1.0, mismatch)


def count_spots(cell_probabilities, threshold: float = SPOT_P, min_cells: int = SPOT_CELLS) -> np.ndarray:
    """`LesionFinder.spots` from `LesionFinder.cell_probabilities`."""
    return np.array([len([g for g in _touching_groups(cells[p > threshold]) if len(g) >= min_cells])
                     for cells, p in cell_probabilities], int)


def _touching_groups(cells: np.ndarray) -> list[list[tuple[int, int]]]:
    """The (n, 2) grid positions grouped into sets that touch (8-neighbours)."""
    left = {tuple(int(v) for v in c) for c in cells}
    groups = []
    while left:
        group, todo = [], [left.pop()]
        while todo:
            y, x = todo.pop()
            group.append((y, x))
            for near in ((y + dy, x + dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1)):
                if near in left:
                    left.remove(near)
                    todo.append(near)
        groups.append(group)
    return groups
