"""Write the example prompt files for the default model: `python -m actwh.compute.default_model.make_prompts`.

ioi.jsonl: IOI prompts on held-out name pairs, half in each order (`meta.order` ABB: the answer
is the first name; BAB: the second), with target (the indirect object), distractor (the subject)
and a corrupted counterpart in which the subject's second mention is replaced by the indirect
object, so that the distractor becomes the right answer; induction.jsonl: random spans from the
whole vocabulary, repeated, with the next token of the second copy as target; successor.jsonl:
days, months and counting.
"""

from __future__ import annotations

import json
import random
import sys

from actwh.compute.default_model import PROMPTS
from actwh.compute.default_model.corpus import (
    DAYS, IOI_TEMPLATES, MONTHS, NUMBERS, ORDERS, SPECIAL_TOKENS, NameSplit, all_words, ioi_prompt,
)


def ioi_rows(rng: random.Random, split: NameSplit, n: int) -> list[dict]:
    """`n` IOI prompts on held-out name pairs, alternating ABB and BAB, templates in turn."""
    rows = []
    for i, pair in enumerate(rng.sample(sorted(split.held_out_pairs), n)):
        io, s = rng.sample(pair, 2)
        t = i // 2 % len(IOI_TEMPLATES)
        p = ioi_prompt(rng, io, s, ORDERS[i % 2], IOI_TEMPLATES[t])
        rows.append({"text": p.text, "target": p.io, "distractor": p.s,
                     "corrupt": " ".join(p.corrupt), "meta": {"order": p.order, "template": t}})
    return rows


def main(seed: int = 1234, n: int = 24, all_files: bool = "--all" in sys.argv) -> None:
    """Writes ioi.jsonl; with --all also induction.jsonl and successor.jsonl (the shipped ones
    were written by the previous generator, commit 2915e22, and are kept as they are: this one
    draws different spans)."""
    rng = random.Random(seed)
    split = NameSplit.make(0)  # the split the shipped model was trained with
    PROMPTS.mkdir(exist_ok=True)
    write("ioi", ioi_rows(rng, split, n))
    if not all_files:
        return
    vocab = [w for w in all_words() if w not in SPECIAL_TOKENS]
    rows = []
    for _ in range(n):
        span = [rng.choice(vocab) for _ in range(rng.randint(6, 10))]
        cut = rng.randint(3, len(span) - 1)
        decoy = list(span)
        rng.shuffle(decoy)
        rows.append({"text": " ".join(span + span[:cut]), "target": span[cut],
                     "corrupt": " ".join(decoy + span[:cut])})
    write("induction", rows)
    rows = []
    for _ in range(n):
        seq = rng.choice([DAYS, MONTHS, NUMBERS])
        k = rng.randint(3, 5)
        # Days and months wrap around; counting does not.
        start = rng.randrange(len(seq) - k - 1 if seq is NUMBERS else len(seq))
        words = [seq[(start + i) % len(seq)] for i in range(k + 1)]
        rows.append({"text": " ".join(words[:-1]), "target": words[-1]})
    write("successor", rows)


def write(name: str, rows: list[dict]) -> None:
    (PROMPTS / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


if __name__ == "__main__":
    main()
