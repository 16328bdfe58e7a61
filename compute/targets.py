"""Targets: the scalar a backward pass differentiates, one value per prompt.

Each target is also written as a linear readout of the logits plus a constant:
`metric = Σ readout · logits + constant`, with the softmax normaliser (for `logprob`, `loss`)
held fixed, the way direct effects hold the LayerNorm scale fixed. Direct effects use the
readout, so they sum exactly to the metric; act × grad uses the true gradient of the metric.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from actwh.errors import PromptError, UnknownName


@dataclass(frozen=True)
class Batch:
    """A padded batch of prompts and what each one is scored on."""

    tokens: torch.Tensor  # [batch, pos] token ids
    mask: torch.Tensor  # [batch, pos] 1 for real tokens, 0 for padding
    target_ids: torch.Tensor | None = None  # [batch] target token per prompt
    distractor_ids: torch.Tensor | None = None  # [batch] for logit_diff
    positions: torch.Tensor | None = None  # [batch] scored position; None = last real token

    @classmethod
    def from_ids(cls, ids: list[list[int]], pad: int = 0, targets=None, distractors=None,
                 positions=None) -> Batch:
        """Prompts' token ids, padded on the right; targets/distractors: a token id per prompt;
        positions: a scored position (or None: the last token) per prompt."""
        n = max(len(x) for x in ids)
        tokens = torch.tensor([x + [pad] * (n - len(x)) for x in ids])
        mask = torch.tensor([[1] * len(x) + [0] * (n - len(x)) for x in ids])
        ints = lambda v: None if v is None else torch.tensor(list(v))  # noqa: E731
        if positions is not None and all(p is None for p in positions):
            positions = None
        if positions is not None:
            positions = [len(x) - 1 if p is None else p for x, p in zip(ids, positions)]
            for i, (x, p) in enumerate(zip(ids, positions)):
                if not 0 <= p < len(x):
                    raise PromptError(f"prompt {i}: position {p} is outside its {len(x)} tokens")
        return cls(tokens, mask, ints(targets), ints(distractors), ints(positions))

    @classmethod
    def from_text(cls, loaded, texts: list[str], targets=None, distractors=None, positions=None,
                  prepend_bos: bool = False) -> Batch:
        """Tokenize prompts with the model's own tokenizer; targets and distractors are one
        token each, as strings (" Mary") or ids."""
        from actwh.compute.inference import encode
        from actwh.compute.prompts import token_id

        ids = [encode(loaded, t, prepend_bos) for t in texts]
        tok = lambda vals, what: None if vals is None else [  # noqa: E731
            token_id(loaded.tokenizer, v, what, i) for i, v in enumerate(vals)]
        return cls.from_ids(ids, loaded.tokenizer.pad_token_id or 0, tok(targets, "target"),
                            tok(distractors, "distractor"), positions)

    @property
    def scored_positions(self) -> torch.Tensor:
        if self.positions is not None:
            return self.positions
        n = self.mask.shape[1]
        return n - 1 - self.mask.flip(-1).long().argmax(-1)  # last real token, either padding

    def to(self, device) -> Batch:
        move = lambda t: None if t is None else t.to(device)  # noqa: E731
        return Batch(move(self.tokens), move(self.mask), move(self.target_ids),
                     move(self.distractor_ids), move(self.positions))


@dataclass(frozen=True)
class Readout:
    """Sparse weights over logits: metric = Σ_i weight_i · logits[batch_i, pos_i, vocab_i] + constant."""

    batch: torch.Tensor
    pos: torch.Tensor
    vocab: torch.Tensor
    weight: torch.Tensor
    constant: torch.Tensor  # [batch]
    # the distinct (batch, pos) read, ascending; known without a host synchronisation
    rows: tuple[torch.Tensor, torch.Tensor] | None = None


def _wide(x: torch.Tensor) -> torch.Tensor:
    """At least float32 for softmax-like reductions, without narrowing float64."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def _scored(logits, b: Batch):
    rows = torch.arange(logits.shape[0], device=logits.device)
    return rows, b.scored_positions.to(logits.device)


def _logit_readout(logits, b: Batch, diff: bool) -> Readout:
    rows, pos = _scored(logits, b)
    ones = torch.ones(len(rows), dtype=logits.dtype, device=logits.device)
    if not diff:
        return Readout(rows, pos, b.target_ids, ones, torch.zeros_like(ones), (rows, pos))
    return Readout(torch.cat([rows, rows]), torch.cat([pos, pos]),
                   torch.cat([b.target_ids, b.distractor_ids]), torch.cat([ones, -ones]),
                   torch.zeros_like(ones), (rows, pos))


def _logprob_readout(logits, b: Batch) -> Readout:
    rows, pos = _scored(logits, b)
    lse = _wide(logits[rows, pos]).logsumexp(-1).to(logits.dtype)
    ones = torch.ones(len(rows), dtype=logits.dtype, device=logits.device)
    return Readout(rows, pos, b.target_ids, ones, -lse, (rows, pos))


def _loss_pairs(b: Batch):
    """(batch, pos) of every real token whose next token is real, and its prompt's pair count."""
    m = b.mask.bool()
    valid = m[:, :-1] & m[:, 1:]
    rows, pos = valid.nonzero(as_tuple=True)
    return rows, pos, valid.sum(-1).clamp(min=1)


def _loss_readout(logits, b: Batch) -> Readout:
    rows, pos, count = _loss_pairs(b)
    nxt = b.tokens[rows, pos + 1]
    weight = -1.0 / count[rows].to(logits.dtype)
    lse = _wide(logits[rows, pos]).logsumexp(-1).to(logits.dtype)
    constant = torch.zeros(logits.shape[0], dtype=logits.dtype, device=logits.device)
    constant.index_add_(0, rows, lse / count[rows])
    return Readout(rows, pos, nxt, weight, constant, (rows, pos))  # nonzero's order: ascending


def _logit(logits, b):
    rows, pos = _scored(logits, b)
    return logits[rows, pos, b.target_ids]


def _logit_diff(logits, b):
    rows, pos = _scored(logits, b)
    return logits[rows, pos, b.target_ids] - logits[rows, pos, b.distractor_ids]


def _logprob(logits, b):
    rows, pos = _scored(logits, b)
    return _wide(logits[rows, pos]).log_softmax(-1)[rows, b.target_ids]


def _loss(logits, b):
    # every (prompt, position) at once, pairs whose next token is padding weighted 0: no
    # host synchronisation (the readout's nonzero) where the loss is only reported
    m = b.mask.bool()
    valid = m[:, :-1] & m[:, 1:]
    nll = -_wide(logits[:, :-1]).log_softmax(-1).gather(-1, b.tokens[:, 1:, None])[..., 0]
    return torch.where(valid, nll, 0).sum(-1) / valid.sum(-1).clamp(min=1)


@dataclass(frozen=True)
class Target:
    name: str
    description: str
    needs_target: bool  # a target token per prompt
    needs_distractor: bool  # a distractor token per prompt
    metric: Callable[[torch.Tensor, Batch], torch.Tensor]  # (logits, batch) -> [batch]
    readout: Callable[[torch.Tensor, Batch], Readout]


TARGETS: dict[str, Target] = {t.name: t for t in [
    Target("loss", "mean next-token cross-entropy over the prompt's real tokens", False, False,
           _loss, _loss_readout),
    Target("logit", "logit of the target token at the scored position", True, False,
           _logit, lambda l, b: _logit_readout(l, b, diff=False)),
    Target("logit_diff", "logit of the target minus logit of the distractor", True, True,
           _logit_diff, lambda l, b: _logit_readout(l, b, diff=True)),
    Target("logprob", "log-probability of the target token at the scored position", True, False,
           _logprob, _logprob_readout),
]}


def get_target(name: str) -> Target:
    if name not in TARGETS:
        raise UnknownName("target", name, TARGETS)
    return TARGETS[name]
