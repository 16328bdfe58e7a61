"""The keep rule: which entries of a score vector survive (`top-k:N`, `threshold:X`, `dense`).

One rule, one parser, used by node selection (`top-k:N:SCALAR`, per prompt and node type), the
component graph's edges (per prompt) and node-level edges (per traced node). Candidates are
ranked by |value|; entries that are not candidates (padding, positions after the reader, pairs
that are not upstream, NaN) are never kept.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch

from actwh.errors import ActwhError

SYNTAX = "top-k:N, threshold:X or dense"


@dataclass(frozen=True)
class KeepRule:
    mode: str  # "top-k", "threshold" or "dense"
    amount: float = 0.0  # N for top-k (a whole number > 0), X for threshold (finite, ≥ 0)

    @classmethod
    def parse(cls, text: str, what: str = "selection", syntax: str = SYNTAX) -> KeepRule:
        """`top-k:N`, `threshold:X` or `dense`; `what` and `syntax` name the option in errors."""
        mode, sep, amount = text.partition(":")
        if mode == "dense" and not sep:
            return cls("dense")
        if mode not in ("top-k", "threshold") or not sep:
            raise ActwhError(f"bad {what} {text!r}; use {syntax}")
        if not amount:
            raise ActwhError(f"bad {what} {text!r}: {mode} needs an amount; use {syntax}")
        if mode == "top-k":
            if not re.fullmatch(r"[0-9]+", amount) or int(amount) <= 0:
                raise ActwhError(f"bad {what} {text!r}: N must be a whole number > 0")
            return cls("top-k", int(amount))
        try:
            x = float(amount)
        except ValueError:
            x = math.nan
        if not math.isfinite(x) or x < 0:
            raise ActwhError(f"bad {what} {text!r}: X must be a finite number ≥ 0")
        return cls("threshold", x)

    def __str__(self) -> str:
        if self.mode == "dense":
            return "dense"
        return f"{self.mode}:{int(self.amount) if self.mode == 'top-k' else self.amount}"

    def keep(self, values: torch.Tensor, candidate: torch.Tensor) -> torch.Tensor:
        """bool mask of kept entries of values [..., n] (the rule applies along the last dim);
        candidate: bool, broadcastable to values."""
        score = values.abs().masked_fill(~candidate | values.isnan(), -1.0)
        if self.mode == "dense":
            return score >= 0
        if self.mode == "threshold":
            return score >= self.amount
        top = score.topk(min(int(self.amount), score.shape[-1]), dim=-1)
        keep = torch.zeros(score.shape, dtype=torch.bool, device=score.device)
        return keep.scatter_(-1, top.indices, top.values >= 0)
