"""Drafts of the next answer tokens from the training answers' n-grams, for exact speculative decoding.

Answers follow a small grammar (`answers.py`: "<entity>: <rationale>. [SEG]"; data/dialogues.py writes the
rationales), so after a few tokens the next ones are often predictable: "… inside the left kidney from round".
`AnswerDrafts` keeps, for every context of the last 1–3 answer tokens seen in training answers, the most frequent
next token and its share. The engine feeds the token it decoded together with a draft of the following ones in
one language-model forward and keeps the drafted tokens as long as they are the model's own greedy choice
(`Engine._generate`): the answer is the one greedy decoding gives, in fewer forwards. A forward of a few tokens
costs little more than one on a CPU (it reads the same weights once).

The table belongs to a checkpoint's tokenizer: `answer_drafts.json` in the model folder, written by
`python -m MediRoundCore.model.answer_drafts FOLDER` from the training dialogues' answers (generated here, the
same generator and mixture the training draws from). A folder without it decodes one token per forward.
"""

from __future__ import annotations

import argparse
import json
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import CheckpointError

DRAFTS_FILE = "answer_drafts.json"
FORMAT = 1
START = -1  # stands before an answer's first token in the contexts
CONTEXT = 3  # tokens of context, backing off to fewer


@dataclass
class AnswerDrafts:
    """context (up to CONTEXT tokens, START-padded) -> (next token, its share among continuations)."""

    table: dict[tuple[int, ...], tuple[int, float]]
    vocab_size: int
    # A forward of 11 tokens costs little more than one of 7, and a wrong drafted token only its own row: lite's
    # later rounds took 8.7 forwards at 6 / 0.5, 7.6 at 10 / 0.3 (~10 ms less a round on 2 cores).
    max_tokens: int = 10  # tokens per draft
    min_share: float = 0.3  # a continuation seen less often than this ends the draft
    stop: frozenset = field(default_factory=frozenset)  # tokens a draft never contains ([SEG], EOS, …)

    @classmethod
    def from_answers(cls, answers: list[list[int]], vocab_size: int, **kwargs) -> "AnswerDrafts":
        """The table of answer token sequences (each through its closing [SEG])."""
        counts: dict[tuple[int, ...], Counter] = defaultdict(Counter)
        for answer in answers:
            seq = [START] * CONTEXT + list(answer)
            for j in range(CONTEXT, len(seq)):
                for n in range(1, CONTEXT + 1):
                    counts[tuple(seq[j - n:j])][seq[j]] += 1
        table = {}
        for context, following in counts.items():
            token, count = following.most_common(1)[0]
            table[context] = (token, count / sum(following.values()))
        return cls(table, vocab_size, **kwargs)

    def draft(self, answer: list[int], limit: int | None = None) -> list[int]:
        """The likely next tokens after `answer` (the tokens decoded so far), at most `limit`."""
        limit = self.max_tokens if limit is None else min(limit, self.max_tokens)
        context = [START] * CONTEXT + list(answer[-CONTEXT:])
        out: list[int] = []
        while len(out) < limit:
            for n in range(CONTEXT, 0, -1):
                found = self.table.get(tuple(context[-n:]))
                if found is not None:
                    break
            if found is None or found[1] < self.min_share or found[0] in self.stop:
                break
            out.append(found[0])
            context.append(found[0])
        return out

    # -- files -----------------------------------------------------------------------------------------
    def save(self, folder: str | Path) -> Path:
        path = Path(folder) / DRAFTS_FILE
        rows = [[list(context), token, round(share, 4)] for context, (token, share) in sorted(self.table.items())]
        path.write_text(json.dumps({"format": FORMAT, "vocab_size": self.vocab_size, "contexts": rows}))
        return path

    @classmethod
    def from_pretrained(cls, folder: str | Path, vocab_size: int, stop=()) -> "AnswerDrafts | None":
        """The drafts stored in a model folder, or None when it has none. A table of another vocabulary is an
        error (it would only waste forwards, but it says the folder was assembled wrongly)."""
        path = Path(folder) / DRAFTS_FILE
        if not path.is_file():
            return None
        try:
            data = json.loads(path.read_text())
            if data.get("format") != FORMAT:
                raise ValueError(f"format {data.get('format')!r}, expected {FORMAT}")
            table = {tuple(int(t) for t in context): (int(token), float(share))
                     for context, token, share in data["contexts"]}
            stored_vocab = int(data["vocab_size"])
        except (OSError, ValueError, TypeError, KeyError) as exc:
            raise CheckpointError(f"{path}: unreadable answer drafts ({exc})") from exc
        if stored_vocab != vocab_size:
            raise CheckpointError(f"{path}: drafts for a vocabulary of {stored_vocab} tokens, the model has "
                                  f"{vocab_size}; rebuild them: python -m MediRoundCore.model.answer_drafts {folder}")
        return cls(table, vocab_size, stop=frozenset(stop))


def training_answers(builder, dialogues: int, seed: int = 7) -> list[list[int]]:
    """Token ids (through [SEG]) of the answers of `dialogues` training dialogues: both training splits, half of
    the queries paraphrased, absent-target rounds inserted (the mixture the trainers draw)."""
    from ..data.splits import iter_varied_samples

    answers = []
    samples = iter_varied_samples(seed, "train+train-long", paraphrase=0.5, absent=0.2)
    for _, sample in zip(range(dialogues), samples):
        for text in sample.answers:
            answers.append(builder.answer(text.replace("[SEG]", ""))[:-1])  # without the closing EOS
    return answers


def build_for_checkpoint(folder: str | Path, dialogues: int = 400) -> Path:
    """Write `answer_drafts.json` into a model folder, for its tokenizer."""
    from .modeling import MediRound
    from .processing import PromptBuilder

    model, tokenizer = MediRound.from_pretrained(folder)
    builder = PromptBuilder.for_model(tokenizer, model)
    drafts = AnswerDrafts.from_answers(training_answers(builder, dialogues), model.config.text.vocab_size)
    return drafts.save(folder)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m MediRoundCore.model.answer_drafts",
                                     description="Write a model folder's answer drafts (answer_drafts.json).")
    parser.add_argument("folder")
    parser.add_argument("--dialogues", type=int, default=400, help="training dialogues to read answers from (400)")
    args = parser.parse_args(argv)
    print(f"wrote {build_for_checkpoint(args.folder, args.dialogues)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
