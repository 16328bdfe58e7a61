"""Choose which nodes of each prompt to keep.

`top-k:N:SCALAR` keeps, per prompt and node type, the N nodes (position, layer, index) of
SCALAR's node type with the largest |SCALAR|; `threshold:X:SCALAR` those with |SCALAR| ≥ X;
`dense` all. Nodes of other types are ranked by their own act × grad (`RANKING`). Every
requested scalar is stored for the kept nodes, pair scalars for the kept heads' query rows, so
joins across scalars work. Output columns are NumPy arrays, ready to become Arrow.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from actwh.compute.keep import KeepRule
from actwh.compute.scalars import RANKING, SCALARS, ScalarResults, get_scalar
from actwh.errors import ActwhError


@dataclass(frozen=True)
class Selection:
    rule: KeepRule  # top-k:N, threshold:X or dense, per prompt and node type
    scalar: str | None = None  # the ranking scalar for its own node type

    @classmethod
    def parse(cls, text: str) -> Selection:
        syntax = "top-k:N:SCALAR, threshold:X:SCALAR or dense"
        rule_text, _, scalar = text.rpartition(":") if text.count(":") == 2 else (text, "", None)
        rule = KeepRule.parse(rule_text, "selection", syntax)
        if (rule.mode == "dense") != (scalar is None):
            raise ActwhError(f"bad selection {text!r}; use {syntax}")
        if scalar is not None:
            s = get_scalar(scalar)
            if s.kind == "pair" and not s.token_form:
                raise ActwhError(f"{s.name} has no per-node value to rank nodes by; rank "
                                 f"{s.node_type} nodes by {RANKING[s.node_type]} instead")
        return cls(rule, scalar)

    @property
    def mode(self) -> str:
        return self.rule.mode

    def __str__(self) -> str:
        return str(self.rule) if self.scalar is None else f"{self.rule}:{self.scalar}"

    def ranking_for(self, node_type: str) -> str:
        if self.scalar is not None and SCALARS[self.scalar].node_type == node_type:
            return self.scalar
        return RANKING[node_type]

    def scalars_needed(self, requested) -> list[str]:
        """The requested scalars plus whatever ranks their node types."""
        types = {SCALARS[n].node_type for n in requested}
        extra = [self.ranking_for(t) for t in sorted(types)] if self.mode != "dense" else []
        return list(dict.fromkeys([*requested, *extra]))


@dataclass
class KeptNodes:
    """The kept entries of one batch, per scalar, in batch coordinates (batch row, position in the
    padded batch); `actwh.rows` turns them into warehouse rows."""

    node: list[dict]  # scalar, node_type (names); batch, pos, layer, node_index, value (tensors)
    pair: list[dict]  # scalar (name); batch, layer, head, query_pos, key_pos, value (tensors)


def _keep_mask(rank: torch.Tensor, real: torch.Tensor, sel: Selection) -> torch.Tensor:
    """rank [b, p, L, n] -> bool [b, p, L, n] of kept nodes (never at pad positions)."""
    candidate = real[:, :, None, None].expand_as(rank)
    return sel.rule.keep(rank.flatten(1), candidate.flatten(1)).view_as(rank)


def _node_major(keep: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Kept entries of keep [b, p, L, n] as (b, L, n, p) indices, in that order.

    Within a prompt, rows go node by node (layer, index), then by position: keys repeat in runs,
    and DuckDB stores a dense run's rows ~14% smaller than position-major ones (top-k rows: the
    same size; benchmarks/bench_loading.py). A few kept entries are found in the mask's own
    layout and sorted; many, in a node-major copy of the mask (nonzero is slow on a permuted view).
    """
    b, p, L, n = keep.shape
    if int(keep.sum()) * 16 < keep.numel():
        bi, pi, li, ni = keep.nonzero(as_tuple=True)
        order = (((bi * L + li) * n + ni) * p + pi).argsort()
        return bi[order], li[order], ni[order], pi[order]
    return keep.permute(0, 2, 3, 1).contiguous().nonzero(as_tuple=True)


def select_nodes(res: ScalarResults, requested, sel: Selection,
                 sae_layers: tuple[int, ...] = ()) -> KeptNodes:
    """The nodes `sel` keeps of each requested scalar (pair scalars: the kept heads' query rows).
    sae_layers: the layer of each spliced autoencoder, in slot order."""
    real = res.mask.bool()
    b, p = real.shape
    keeps: dict[str, torch.Tensor] = {}
    kept: dict[str, tuple[torch.Tensor, ...]] = {}  # node type -> its kept (b, L, n, p) indices
    node_parts, pair_parts = [], []
    for name in requested:
        s = SCALARS[name]
        if name not in res.token:
            continue
        if s.node_type not in keeps:
            # dense keeps every node, so any of the type's scalars can say where nodes exist
            rank = res.token.get(sel.ranking_for(s.node_type), res.token[name])
            if s.node_type == "sae_latent":  # only active latents are candidates (act × grad = 0 else)
                rank = rank.masked_fill(rank == 0, float("nan"))
            keeps[s.node_type] = _keep_mask(rank, real, sel)
            kept[s.node_type] = _node_major(keeps[s.node_type])
        bi, li, ni, pi = kept[s.node_type]
        if s.embed_level:
            layer = li - 1
        elif s.sae_level:
            layer = torch.as_tensor(sae_layers, device=li.device, dtype=li.dtype)[li]
        else:
            layer = li
        node_parts.append(dict(scalar=name, node_type=s.node_type, batch=bi, pos=pi, layer=layer,
                               node_index=ni, value=res.token[name][bi, pi, li, ni]))
    for name, t in res.pair.items():
        if name not in requested:
            continue
        if "attn_head" not in keeps:
            if sel.mode == "dense":  # nothing to rank: every head at every real query position
                n_layers, n_heads = t.shape[1], t.shape[2]
                keeps["attn_head"] = real[:, :, None, None].expand(b, p, n_layers, n_heads)
            else:
                keeps["attn_head"] = _keep_mask(res.token[sel.ranking_for("attn_head")], real, sel)
        # kept (b, q, L, h) -> every real key k <= q of that head's row
        rows = keeps["attn_head"].permute(0, 2, 3, 1)  # [b, L, h, q]
        causal = torch.ones(p, p, dtype=torch.bool, device=real.device).tril()
        full = rows[..., None] & causal & real[:, None, None, None, :]
        bi, li, hi, qi, ki = full.nonzero(as_tuple=True)
        pair_parts.append(dict(scalar=name, batch=bi, layer=li, head=hi, query_pos=qi, key_pos=ki,
                               value=t[bi, li, hi, qi, ki]))
    return KeptNodes(node_parts, pair_parts)
