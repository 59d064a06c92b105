"""Probe: answer drafts from the n-gram table alone, or falling back to the conversation (the current query and
earlier answers: "left kidney" in "segment the left kidney") where the table is unsure (issue 23 latency).
Hard-split reference answers; costs per forward of 1 + k tokens as in answer_draft_cost.py."""
from MediRoundCore.data.splits import make_dialogue, to_sample
from MediRoundCore.model.answer_drafts import AnswerDrafts, CONTEXT, START, training_answers
from MediRoundCore.model.lite import lite_tokenizer
from MediRoundCore.model.processing import PromptBuilder
from MediRoundCore.model.tokenizer import TokenIds

COST_MS = {0: 3.5, 1: 4.3, 2: 5.0, 3: 5.9, 4: 6.0, 5: 6.2, 6: 6.4, 7: 6.6, 8: 6.8}
tok = lite_tokenizer(); ids = TokenIds.from_tokenizer(tok)
builder = PromptBuilder(tok, ids, "plain", 64)
drafts = AnswerDrafts.from_answers(training_answers(builder, 400), len(tok), stop={ids.seg, ids.eos})


def lookup(context, answer, k):
    tail = ([START] * CONTEXT + answer)[-2:]
    for n in (2, 1):
        key = tail[-n:]
        if START in key:
            continue
        for start in range(len(context) - n, -1, -1):
            if context[start:start + n] == key:
                return context[start + n:start + n + k]
    return []


for mode in ("table", "table+conversation"):
    ms = base = 0
    for index in range(30):
        d = to_sample(make_dialogue("hard", 0, index))
        context = builder.prefix()
        for r, (q, a) in enumerate(zip(d.queries, d.answers)):
            context += builder.user(q, d.ref_indices[r] is not None, first=r == 0)
            target = builder.answer(a.replace("[SEG]", ""))[:-1]
            pos = 1
            while pos < len(target):
                g = drafts.draft(target[:pos])
                if mode != "table" and not g:
                    g = [t for t in lookup(context, target[:pos], 6) if t not in (ids.seg, ids.eos, ids.image)]
                acc = 0
                while acc < len(g) and pos + acc < len(target) and g[acc] == target[pos + acc]:
                    acc += 1
                ms += COST_MS[len(g)]
                pos += acc + 1
            base += 3.5 * (len(target) - 1)
            context += target + [ids.eos]
    print(f"{mode}: {ms / base:.2f} of one token per forward")
