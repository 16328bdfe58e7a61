"""Training text with known mechanisms, for the embedded default model.

Every document comes from a small grammar over fixed word lists, so the tasks it teaches have
known answers: induction (a random span repeated later), indirect-object identification (IOI)
templates in the style of Wang et al. 2022, successor sequences (days, months, counting), copy
drills for the curriculum, and filler sentences. Words are whole tokens (a word-level tokenizer),
which keeps the unembedding cheap and makes every name a single token.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

NAMES = """Mary John Alice Bob Carol David Emma Frank Grace Henry Irene Jack Karen Leo Laura Mike Nancy
Oscar Paula Quinn Rachel Sam Tina Uma Victor Wendy Xavier Yara Zach Anna Ben Chloe Dan Eva Fred Gina
Hugo Ivy Jake Kate Liam Mia Noah Olga Pete Rosa Sean Tara Ugo Vera Will Zoe Adam Beth Carl Dora Eric
Fiona Gary Hana Ian Jane Kyle Lily Mark Nina Owen Pam Ray Sara Tom Ursula Vince Wanda Alex Bella Chris
Diana Ethan Flora George Holly Isaac Julia Kevin Lucy Martin Nora Oliver Penny Robert Sophie Thomas
Amy Brian Clara Derek Ella Felix Gwen Harry Iris Jason Kira Lena Max Nadia Otto Polly Rick Stella
Tyler Val Wes Yvonne Zara Abel Bruno Cora Dean Edith Floyd Greta Hank Ingrid Joel Kurt Lola Milo""".split()

PLACES = """store park school office garden station market library beach museum hospital restaurant
cafe church bank airport theater stadium bakery farm harbor hotel castle forest river village city
mountain lake island bridge tower factory studio gym kitchen cinema zoo mall palace""".split()

OBJECTS = """drink book ball apple bottle letter ring cake flower gift pen key hat bag cup card coin
phone map lamp box toy shirt basket clock candle painting ticket sandwich umbrella necklace kite
guitar camera wallet scarf cookie pencil bowl plate""".split()

DAYS = "monday tuesday wednesday thursday friday saturday sunday".split()
MONTHS = """january february march april may june july august september october november
december""".split()
NUMBERS = """one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen
sixteen seventeen eighteen nineteen twenty""".split()

ADJECTIVES = """big small red blue green old new happy sad quick slow bright dark quiet loud warm cold
soft hard tall short young clever brave calm busy lazy""".split()
NOUNS = """dog cat bird fish horse cow tree house car boat train road door window table chair bed
cloud sun moon star rain snow wind fire water stone paper song story game""".split()
VERBS = """saw liked found took made wanted watched painted carried moved opened closed cleaned
bought sold held kept left visited heard""".split()
FILLER = """the a an and or but then so very quite it this that there here was is were are had has
to of in on at with from by for about after before while when because today yesterday tomorrow
always never often sometimes again also just still even""".split()
PUNCT = [".", ","]

# Words every template needs that no list above carries.
TEMPLATE_WORDS = """When Then After While Friends Afterwards went gave said had long argument were
working found it met talked later handed decided give""".split()

SPECIAL_TOKENS = ["<|endoftext|>", "<unk>", "<pad>"]

# {IO} is the indirect object (the answer), {S} the subject, named twice. Each template is used
# in both orders of the first clause: ABB ("{IO} and {S}", the answer first) and BAB
# ("{S} and {IO}", the answer second), in equal measure, so position never gives the answer away.
IOI_TEMPLATES = [
    "When {A} and {B} went to the {place} , {S} gave a {obj} to",
    "When {A} and {B} went to the {place} , {S} gave the {obj} to",
    "After {A} and {B} went to the {place} , {S} gave a {obj} to",
    "While {A} and {B} were working at the {place} , {S} gave a {obj} to",
    "Then , {A} and {B} went to the {place} . {S} gave a {obj} to",
    "Then , {A} and {B} had a long argument . Afterwards {S} said to",
    "Friends {A} and {B} found a {obj} at the {place} . {S} gave it to",
    "When {A} and {B} met at the {place} , {S} handed the {obj} to",
    "After {A} and {B} talked at the {place} , {S} decided to give a {obj} to",
]
ORDERS = ("ABB", "BAB")


def all_words() -> list[str]:
    """Every word the grammar can produce, in a fixed order (specials excluded)."""
    seen: dict[str, None] = {}
    for group in (NAMES, PLACES, OBJECTS, DAYS, MONTHS, NUMBERS, ADJECTIVES, NOUNS, VERBS, FILLER,
                  PUNCT, TEMPLATE_WORDS):
        for w in group:
            seen.setdefault(w, None)
    return list(seen)


@dataclass(frozen=True)
class NameSplit:
    """Which names and name pairs IOI training may use; the rest is held out for evaluation."""

    ioi_names: tuple[str, ...]  # names that appear in IOI training documents
    unseen_names: tuple[str, ...]  # names never used in IOI training (only in filler and spans)
    held_out_pairs: frozenset[tuple[str, str]]  # unordered pairs of ioi_names never trained together

    @classmethod
    def make(cls, seed: int = 0, n_unseen: int = 30, held_out_fraction: float = 0.1) -> NameSplit:
        rng = random.Random(seed)
        names = list(NAMES)
        rng.shuffle(names)
        unseen, ioi = names[:n_unseen], sorted(names[n_unseen:])
        pairs = [(a, b) for i, a in enumerate(ioi) for b in ioi[i + 1:]]
        rng.shuffle(pairs)
        held = frozenset(pairs[: int(len(pairs) * held_out_fraction)])
        return cls(tuple(ioi), tuple(sorted(unseen)), held)

    def is_held_out(self, a: str, b: str) -> bool:
        return (a, b) in self.held_out_pairs or (b, a) in self.held_out_pairs


@dataclass(frozen=True)
class IOIPrompt:
    """One IOI sentence, cut before the answer."""

    words: list[str]
    io: str  # the indirect object: the answer
    s: str  # the subject, named twice: the distractor
    order: str  # "ABB": the answer is the first name, "BAB": the second
    corrupt: list[str]  # the repeated name replaced by the answer: the answer becomes the subject

    @property
    def text(self) -> str:
        return " ".join(self.words)


def ioi_prompt(rng: random.Random, io: str, s: str, order: str | None = None,
               template: str | None = None) -> IOIPrompt:
    """An IOI prompt with indirect object `io` (the answer) and subject `s`.

    `order` ABB names the indirect object first ("When Mary and John ..., John gave a drink to"),
    BAB second ("When John and Mary ..., John gave a drink to"); None draws it with even odds. The
    corrupted counterpart names `io` where the subject's second mention was, which makes `s` the
    right answer: the logit difference io - s changes sign.
    """
    if order is None:
        order = ORDERS[rng.random() < 0.5]
    if order not in ORDERS:
        raise ValueError(f"unknown IOI order {order!r}; expected one of {ORDERS}")
    template = template if template is not None else rng.choice(IOI_TEMPLATES)
    first, second = (io, s) if order == "ABB" else (s, io)
    fill = dict(A=first, B=second, place=rng.choice(PLACES), obj=rng.choice(OBJECTS))
    words = template.format(S=s, **fill).split()
    corrupt = template.format(S=io, **fill).split()
    return IOIPrompt(words, io, s, order, corrupt)


class Corpus:
    """Seeded document generator. Documents are lists of words."""

    def __init__(self, seed: int, split: NameSplit, vocab_words: list[str], abb_share: float = 0.5):
        self.rng = random.Random(seed)
        self.abb_share = abb_share
        self.split = split
        self.vocab_words = vocab_words

    def filler_sentence(self) -> list[str]:
        r = self.rng
        subj = r.choice([["the", r.choice(ADJECTIVES), r.choice(NOUNS)], [r.choice(NAMES)]])
        obj = r.choice([["the", r.choice(NOUNS)], ["a", r.choice(ADJECTIVES), r.choice(OBJECTS)],
                        [r.choice(NAMES)]])
        tail = r.choice([[], ["at", "the", r.choice(PLACES)], [r.choice(FILLER[30:])],
                         ["in", r.choice(MONTHS)], ["on", r.choice(DAYS)]])
        return subj + [r.choice(VERBS)] + obj + tail + ["."]

    def filler(self, n_sentences: int) -> list[str]:
        out: list[str] = []
        for _ in range(n_sentences):
            out += self.filler_sentence()
        return out

    def ioi(self) -> list[str]:
        r = self.rng
        while True:
            a, b = r.sample(self.split.ioi_names, 2)
            if not self.split.is_held_out(a, b):
                break
        p = ioi_prompt(r, a, b, None if self.abb_share == 0.5 else
                       ORDERS[r.random() >= self.abb_share])
        return self.filler(r.randint(0, 1)) + p.words + [p.io, "."]

    def successor(self) -> list[str]:
        r = self.rng
        seq = r.choice([DAYS, MONTHS, NUMBERS])
        start = r.randrange(len(seq))
        n = r.randint(4, 12)
        if seq is NUMBERS:
            n = min(n, len(seq) - start)
            return [seq[start + i] for i in range(max(n, 1))] + ["."]
        return [seq[(start + i) % len(seq)] for i in range(n)] + ["."]

    def induction(self) -> list[str]:
        """A span of words drawn uniformly from the whole vocabulary, repeated after a gap."""
        r = self.rng
        span = [r.choice(self.vocab_words) for _ in range(r.randint(4, 20))]
        gap = self.filler(r.randint(0, 2))
        return self.filler(r.randint(0, 1)) + span + gap + span[: r.randint(3, len(span))]

    def copy_drill(self, alphabet: int) -> list[str]:
        """Curriculum: one short span from a small per-document alphabet, repeated 2-4 times."""
        r = self.rng
        letters = r.sample(self.vocab_words, min(alphabet, len(self.vocab_words)))
        span = [r.choice(letters) for _ in range(r.randint(8, 16))]
        return span * r.randint(2, 4)

    def skip_drill(self, alphabet: int) -> list[str]:
        """Curriculum: triples `x r x` over a small per-document alphabet. The third word is the
        one before the previous word: only a head that attends to the previous token (and copies
        it) predicts it, the first half of an induction circuit."""
        r = self.rng
        letters = r.sample(self.vocab_words, min(alphabet, len(self.vocab_words)))
        out: list[str] = []
        for _ in range(r.randint(4, 10)):
            x, y = r.choice(letters), r.choice(letters)
            out += [x, y, x]
        return out

    def document(self, mix: dict[str, float], alphabet: int) -> list[str]:
        kind = self.rng.choices(list(mix), weights=list(mix.values()))[0]
        if kind == "copy":
            return self.copy_drill(alphabet)
        if kind == "skip":
            return self.skip_drill(alphabet)
        if kind == "filler":
            return self.filler(self.rng.randint(1, 4))
        return getattr(self, kind)()
