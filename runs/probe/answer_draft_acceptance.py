"""Probe: how many answer tokens a prompt-lookup drafter would get accepted (issue 23 latency).

Simulated on generated long dialogues' reference answers (what a trained model reproduces): the context is the
conversation's token ids so far (queries, earlier answers, this round's query); a draft is the continuation
of the latest earlier occurrence of the last n answer-or-context tokens (n = 3, 2, 1), up to K tokens.
A verification forward of (accepted + 1) tokens then yields accepted + 1 tokens."""
import sys
from MediRoundCore.data.splits import long_dialogue
from MediRoundCore.model.lite import lite_tokenizer
from MediRoundCore.model.processing import PromptBuilder
from MediRoundCore.model.tokenizer import TokenIds

tok = lite_tokenizer()
ids = TokenIds.from_tokenizer(tok)
builder = PromptBuilder(tok, ids, "plain", 64)
K = int(sys.argv[1]) if len(sys.argv) > 1 else 8


def draft(context, k):
    for n in (3, 2, 1):
        if len(context) < n:
            continue
        tail = context[-n:]
        for start in range(len(context) - n - 1, -1, -1):
            if context[start:start + n] == tail:
                return context[start + n:start + n + k]
    return []


forwards = tokens = 0
for seed in range(40):
    d = long_dialogue(seed, n_rounds=8)
    context = builder.prefix()
    for r, (q, a) in enumerate(zip(d.queries, d.answers)):
        context += builder.user(q, d.ref_indices[r] is not None, first=r == 0)
        target = builder.answer(a.replace("[SEG]", ""))[:-1]  # through [SEG]
        pos = 0
        while pos < len(target):
            guess = draft(context + target[:pos], K)
            accepted = 0
            while accepted < len(guess) and pos + accepted < len(target) and guess[accepted] == target[pos + accepted]:
                accepted += 1
            pos += accepted + 1
            forwards += 1
        tokens += len(target)
        context += target + [ids.eos]
print(f"K={K}: {tokens} answer tokens in {forwards} forwards: {tokens / forwards:.2f} tokens per forward")
