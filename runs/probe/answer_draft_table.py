"""Probe: a drafter from the answer grammar (a table of the most frequent next token after each token pair in
training answers) combined with prompt lookup, simulated on hard-split reference answers (issue 23 latency)."""
import sys
from collections import Counter, defaultdict
from MediRoundCore.data.splits import iter_varied_samples, make_dialogue, to_sample
from MediRoundCore.model.lite import lite_tokenizer
from MediRoundCore.model.processing import PromptBuilder
from MediRoundCore.model.tokenizer import TokenIds

tok = lite_tokenizer(); ids = TokenIds.from_tokenizer(tok)
builder = PromptBuilder(tok, ids, "plain", 64)
K = int(sys.argv[1]) if len(sys.argv) > 1 else 8
N_TRAIN = int(sys.argv[2]) if len(sys.argv) > 2 else 300

counts = defaultdict(Counter)
for i, s in zip(range(N_TRAIN), iter_varied_samples(7, "train+train-long", paraphrase=0.5, absent=0.2)):
    for a in s.answers:
        seq = [ids.eos] + builder.answer(a.replace("[SEG]", ""))[:-1]
        seq = [ids.eos] + seq
        for j in range(2, len(seq)):
            counts[(seq[j - 2], seq[j - 1])][seq[j]] += 1
table = {k: c.most_common(1)[0][0] for k, c in counts.items()}
print(len(table), "pairs")


def lookup(context, k, n):
    tail = context[-n:]
    for start in range(len(context) - n - 1, -1, -1):
        if context[start:start + n] == tail:
            return context[start + n:start + n + k]
    return []


def chain(prev2, k):
    out, a, b = [], *prev2
    while len(out) < k and (a, b) in table:
        nxt = table[(a, b)]
        out.append(nxt)
        a, b = b, nxt
    return out


def draft(context, answer_so_far, k, mode):
    prev = ([ids.eos, ids.eos] + answer_so_far)[-2:]
    if mode == "table":
        return chain(prev, k)
    if mode == "lookup":
        return lookup(context, k, 3) or lookup(context, k, 2) or lookup(context, k, 1)
    return lookup(context, k, 3) or chain(prev, k) or lookup(context, k, 2)


for mode in ("lookup", "table", "both"):
    forwards = tokens = 0
    for index in range(30):
        d = to_sample(make_dialogue("hard", 0, index))
        context = builder.prefix()
        for r, (q, a) in enumerate(zip(d.queries, d.answers)):
            context += builder.user(q, d.ref_indices[r] is not None, first=r == 0)
            target = builder.answer(a.replace("[SEG]", ""))[:-1]
            pos = 0
            while pos < len(target):
                guess = draft(context + target[:pos], target[:pos], K, mode)
                acc = 0
                while acc < len(guess) and pos + acc < len(target) and guess[acc] == target[pos + acc]:
                    acc += 1
                pos += acc + 1; forwards += 1
            tokens += len(target); context += target + [ids.eos]
    print(f"{mode} K={K}: {tokens} tokens in {forwards} forwards: {tokens / forwards:.2f} per forward")
