"""Choose which nodes of each prompt to keep, and flatten them into columns.

`top-k:N:SCALAR` keeps, per prompt and node type, the N nodes (position, layer, index) of
SCALAR's node type with the largest |SCALAR|; `threshold:X:SCALAR` those with |SCALAR| ≥ X;
`dense` all. Nodes of other types are ranked by their own act × grad (`RANKING`). Every
requested scalar is stored for the kept nodes, pair scalars for the kept heads' query rows, so
joins across scalars work. Output columns are NumPy arrays, ready to become Arrow.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from actwh.compute.scalars import NODE_TYPES, RANKING, SCALARS, ScalarResults, get_scalar
from actwh.errors import ActwhError


@dataclass(frozen=True)
class Selection:
    mode: str  # "top-k", "threshold" or "dense"
    amount: float = 0.0  # N for top-k, X for threshold
    scalar: str | None = None  # the ranking scalar for its own node type

    @classmethod
    def parse(cls, text: str) -> Selection:
        parts = text.split(":")
        if parts == ["dense"]:
            return cls("dense")
        if len(parts) == 3:
            s = get_scalar(parts[2])
            if s.kind == "pair" and not s.token_form:
                raise ActwhError(f"{s.name} has no per-node value to rank nodes by; rank "
                                 f"{s.node_type} nodes by {RANKING[s.node_type]} instead")
        try:
            if len(parts) == 3 and parts[0] == "top-k" and int(parts[1]) > 0:
                return cls("top-k", int(parts[1]), parts[2])
            if len(parts) == 3 and parts[0] == "threshold":
                return cls("threshold", float(parts[1]), parts[2])
        except ValueError:
            pass
        raise ActwhError(f"bad selection {text!r}; use top-k:N:SCALAR, threshold:X:SCALAR or dense")

    def __str__(self) -> str:
        if self.mode == "dense":
            return "dense"
        amount = int(self.amount) if self.mode == "top-k" else self.amount
        return f"{self.mode}:{amount}:{self.scalar}"

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
class Columns:
    """node_scalars and pair_scalars rows of one batch, as arrays; codes index the name tuples."""

    node: dict[str, np.ndarray]  # prompt_id, position, layer, node_type, node_index, scalar, value
    pair: dict[str, np.ndarray]  # prompt_id, layer, head, query_pos, key_pos, scalar, value
    scalar_names: tuple[str, ...]
    node_type_names: tuple[str, ...] = NODE_TYPES


def _keep_mask(rank: torch.Tensor, real: torch.Tensor, sel: Selection) -> torch.Tensor:
    """rank [b, p, L, n] -> bool [b, p, L, n] of kept nodes (never at pad positions)."""
    score = rank.abs().masked_fill(~real[:, :, None, None] | rank.isnan(), -1.0)
    if sel.mode == "dense":
        return score >= 0
    if sel.mode == "threshold":
        return score >= sel.amount
    flat = score.flatten(1)
    k = min(int(sel.amount), flat.shape[1])
    top = flat.topk(k, dim=1)
    keep = torch.zeros_like(flat, dtype=torch.bool)
    keep.scatter_(1, top.indices, top.values >= 0)
    return keep.view_as(score)


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


def to_columns(res: ScalarResults, requested, sel: Selection, prompt_ids,
               sae_layers: tuple[int, ...] = ()) -> Columns:
    """sae_layers: the layer of each spliced autoencoder, in slot order."""
    real = res.mask.bool()
    b, p = real.shape
    offset = real.long().argmax(-1)  # first real token: positions count from it (left padding)
    pids = torch.as_tensor(np.asarray(prompt_ids), device=real.device)
    scalar_names = tuple(SCALARS)
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
        node_parts.append(dict(
            prompt_id=pids[bi], position=pi - offset[bi], layer=layer,
            node_type=torch.full_like(bi, NODE_TYPES.index(s.node_type)), node_index=ni,
            scalar=torch.full_like(bi, scalar_names.index(name)),
            value=res.token[name][bi, pi, li, ni]))
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
        pair_parts.append(dict(
            prompt_id=pids[bi], layer=li, head=hi, query_pos=qi - offset[bi],
            key_pos=ki - offset[bi], scalar=torch.full_like(bi, scalar_names.index(name)),
            value=t[bi, li, hi, qi, ki]))
    node_dtypes = dict(prompt_id=np.int32, position=np.int32, layer=np.int16, node_type=np.int8,
                       node_index=np.int32, scalar=np.int8, value=np.float32)
    pair_dtypes = dict(prompt_id=np.int32, layer=np.int16, head=np.int16, query_pos=np.int32,
                       key_pos=np.int32, scalar=np.int8, value=np.float32)
    return Columns(_concat(node_parts, node_dtypes), _concat(pair_parts, pair_dtypes), scalar_names)


def _concat(parts: list[dict], dtypes: dict) -> dict[str, np.ndarray]:
    """Concatenate, convert once to NumPy, and sort stably by prompt (zone maps need it)."""
    if not parts:
        return {k: np.zeros(0, dtype=d) for k, d in dtypes.items()}
    cols = {}
    for k, d in dtypes.items():
        t = torch.cat([part[k] for part in parts]).detach()
        if t.is_floating_point():
            t = t.float()  # bfloat16 has no NumPy dtype; values are stored as float32 anyway
        cols[k] = t.to("cpu").numpy().astype(d, copy=False)
    order = np.argsort(cols["prompt_id"], kind="stable")
    return {k: v[order] for k, v in cols.items()}
