"""Probe: expected answer-decoding time with drafts from the training answers' token n-grams (issue 23 latency).

Table: for each context of the last n answer tokens (n = 3, backing off to 2), the most frequent next token and its
share. A draft chains continuations while each share is at least `min_share`, up to K tokens. Simulated on
hard-split reference answers; a verify forward of 1 + k tokens costs COST_MS[k] (lite, measured on this machine by
runs/probe/lite_verify_cost.py), a plain step 3.5 ms."""
import sys
from collections import Counter, defaultdict
from MediRoundCore.data.splits import iter_varied_samples, make_dialogue, to_sample
from MediRoundCore.model.lite import lite_tokenizer
from MediRoundCore.model.processing import PromptBuilder
from MediRoundCore.model.tokenizer import TokenIds

COST_MS = {0: 3.5, 1: 4.3, 2: 5.0, 3: 5.9, 4: 6.0, 5: 6.2, 6: 6.4, 7: 6.6, 8: 6.8}
tok = lite_tokenizer(); ids = TokenIds.from_tokenizer(tok)
builder = PromptBuilder(tok, ids, "plain", 64)
N_TRAIN = int(sys.argv[1]) if len(sys.argv) > 1 else 400
START = ids.eos
tables = {n: defaultdict(Counter) for n in (1, 2, 3)}
for i, s in zip(range(N_TRAIN), iter_varied_samples(7, "train+train-long", paraphrase=0.5, absent=0.2)):
    for a in s.answers:
        seq = [START] * 3 + builder.answer(a.replace("[SEG]", ""))[:-1]
        for j in range(3, len(seq)):
            for n in (1, 2, 3):
                tables[n][tuple(seq[j - n:j])][seq[j]] += 1


def best(context):
    for n in (3, 2, 1):
        c = tables[n].get(tuple(context[-n:]))
        if c:
            token, count = c.most_common(1)[0]
            return token, count / sum(c.values())
    return None, 0.0


def draft(answer, k, min_share):
    ctx, out = [START] * 3 + list(answer), []
    while len(out) < k:
        token, share = best(ctx)
        if token is None or share < min_share:
            break
        out.append(token); ctx.append(token)
    return out


for K in (4, 8):
    for min_share in (0.3, 0.5, 0.7, 0.9):
        ms = base = tokens = forwards = 0
        for index in range(30):
            d = to_sample(make_dialogue("hard", 0, index))
            for q, a in zip(d.queries, d.answers):
                target = builder.answer(a.replace("[SEG]", ""))[:-1]  # the tokens through [SEG]
                # the prompt forward yields target[0]; each later forward feeds the last token (+ a draft)
                pos = 1
                while pos < len(target):
                    g = draft(target[:pos], K, min_share)
                    acc = 0
                    while acc < len(g) and pos + acc < len(target) and g[acc] == target[pos + acc]:
                        acc += 1
                    ms += COST_MS[len(g)]; forwards += 1
                    pos += acc + 1
                base += 3.5 * (len(target) - 1); tokens += len(target)
        print(f"K={K} min_share={min_share}: {forwards} forwards for {tokens} tokens; {ms / base:.2f} of the time "
              f"of one token per forward")
