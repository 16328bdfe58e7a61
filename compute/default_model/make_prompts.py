"""Write the example prompt files for the default model: `python -m actwh.compute.default_model.make_prompts`.

ioi.jsonl: IOI prompts on held-out name pairs with target (the indirect object), distractor
(the subject) and a corrupted counterpart (a third name in place of the subject's first
mention); induction.jsonl: random spans from the whole vocabulary, repeated, with the next
token of the second copy as target; successor.jsonl: days, months and counting.
"""

from __future__ import annotations

import json
import random

from actwh.compute.default_model import PROMPTS
from actwh.compute.default_model.corpus import (
    DAYS, MONTHS, NUMBERS, SPECIAL_TOKENS, NameSplit, all_words, ioi_prompt,
)


def main(seed: int = 1234, n: int = 24) -> None:
    rng = random.Random(seed)
    split = NameSplit.make(0)  # the split the shipped model was trained with
    PROMPTS.mkdir(exist_ok=True)
    rows = []
    for a, b in rng.sample(sorted(split.held_out_pairs), n):
        words, answer, subject = ioi_prompt(rng, a, b)
        other = rng.choice([x for x in split.ioi_names if x not in (a, b)])
        corrupt = list(words)
        corrupt[corrupt.index(subject)] = other  # the subject's first mention
        rows.append({"text": " ".join(words), "target": answer, "distractor": subject,
                     "corrupt": " ".join(corrupt)})
    write("ioi", rows)
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
