"""Warehouse rows from compute results: the one place that knows the tables' row conventions.

- codes: `node_type`, `scalar` and `down_input` are Arrow dictionary arrays whose codes index
  `actwh.ontology.NODE_TYPES`, the scalar registry and `DOWN_INPUTS`;
- dtypes: each column's width (`NODE`, `PAIR`, `EDGE` below);
- positions count from each prompt's first real token (`first_real`), whichever side was padded;
- NULL: summed positions (`up_pos`, `down_pos`) and `down_input` of nodes other than heads;
  inside this module both are the code `NONE` (-1), turned into NULL once, in `arrow_table`;
- rows are sorted stably by prompt (DuckDB's zone maps prune prompt lookups by it).

Compute hands over what it kept in batch coordinates (batch row, position in the padded batch):
`compute.selection.select_nodes`, `compute.edges.kept_edges`, `compute.node_edges.kept_inputs`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import torch

from actwh.ontology import DOWN_INPUTS, NODE_TYPES

NONE = -1  # a summed position or an absent down_input; NULL in the warehouse
NODE = dict(prompt_id=np.int32, position=np.int32, layer=np.int16, node_type=np.int8,
            node_index=np.int32, scalar=np.int8, value=np.float32)
PAIR = dict(prompt_id=np.int32, layer=np.int16, head=np.int16, query_pos=np.int32,
            key_pos=np.int32, scalar=np.int8, value=np.float32)
EDGE = dict(prompt_id=np.int32, up_layer=np.int16, up_type=np.int8, up_index=np.int32,
            up_pos=np.int32, down_layer=np.int16, down_type=np.int8, down_index=np.int32,
            down_pos=np.int32, down_input=np.int8, value=np.float32)
NULLABLE = ("up_pos", "down_pos", "down_input")


def first_real(mask: torch.Tensor) -> torch.Tensor:
    """[batch] index of each prompt's first real token: stored positions count from it."""
    return mask.bool().long().argmax(-1)


def node_type_code(name: str) -> int:
    return NODE_TYPES.index(name)


def down_input_code(name: str | None) -> int:
    return NONE if name is None else DOWN_INPUTS.index(name)


def _numpy(t, dtype) -> np.ndarray:
    if isinstance(t, torch.Tensor):
        t = t.detach()
        if t.is_floating_point():
            t = t.float()  # bfloat16 has no NumPy dtype; values are stored as float32 anyway
        t = t.to("cpu").numpy()
    return np.asarray(t).astype(dtype, copy=False)


def _columns(parts: list[dict], dtypes: dict) -> dict[str, np.ndarray]:
    """Concatenate parts (dicts of tensors or arrays), convert once to NumPy, sort by prompt."""
    if not parts:
        return {k: np.zeros(0, dtype=d) for k, d in dtypes.items()}
    cols = {}
    for k, d in dtypes.items():
        if isinstance(parts[0][k], torch.Tensor):
            cols[k] = _numpy(torch.cat([part[k] for part in parts]), d)
        else:
            cols[k] = np.concatenate([_numpy(part[k], d) for part in parts])
    order = np.argsort(cols["prompt_id"], kind="stable")
    return {k: v[order] for k, v in cols.items()}


@dataclass
class Columns:
    """node_scalars and pair_scalars rows of one batch, as arrays; codes index the name tuples."""

    node: dict[str, np.ndarray]  # prompt_id, position, layer, node_type, node_index, scalar, value
    pair: dict[str, np.ndarray]  # prompt_id, layer, head, query_pos, key_pos, scalar, value
    scalar_names: tuple[str, ...]


def node_columns(kept, prompt_ids, mask: torch.Tensor) -> Columns:
    """Rows of `compute.selection.select_nodes`' kept entries."""
    from actwh.compute.scalars import SCALARS

    scalar_names = tuple(SCALARS)
    offset = first_real(mask)
    pids = torch.as_tensor(np.asarray(prompt_ids), device=mask.device)
    node = [dict(prompt_id=pids[k["batch"]], position=k["pos"] - offset[k["batch"]],
                 layer=k["layer"], node_type=torch.full_like(k["batch"], node_type_code(k["node_type"])),
                 node_index=k["node_index"],
                 scalar=torch.full_like(k["batch"], scalar_names.index(k["scalar"])), value=k["value"])
            for k in kept.node]
    pair = [dict(prompt_id=pids[k["batch"]], layer=k["layer"], head=k["head"],
                 query_pos=k["query_pos"] - offset[k["batch"]],
                 key_pos=k["key_pos"] - offset[k["batch"]],
                 scalar=torch.full_like(k["batch"], scalar_names.index(k["scalar"])), value=k["value"])
            for k in kept.pair]
    return Columns(_columns(node, NODE), _columns(pair, PAIR), scalar_names)


def to_columns(res, requested, sel, prompt_ids, sae_layers: tuple[int, ...] = ()) -> Columns:
    """Select nodes (`compute.selection`) and turn them into node and pair rows."""
    from actwh.compute.selection import select_nodes

    return node_columns(select_nodes(res, requested, sel, sae_layers), prompt_ids, res.mask)


def component_edge_part(res, kept, prompt_ids, target_ids, mask: torch.Tensor) -> dict:
    """Rows of `compute.edges.kept_edges`. target_ids: the target token per prompt (the logit
    node's index), None when the target has none (loss)."""
    bi, pos, ui, vi, values = (None if t is None else t.cpu() for t in kept)

    def attr(nodes, f, idx):
        return torch.tensor([f(n) for n in nodes], dtype=torch.long)[idx]

    down_type = attr(res.down, lambda n: node_type_code(n.node_type), vi)
    down_index = attr(res.down, lambda n: n.index, vi)
    is_logit = down_type == node_type_code("logit")
    down_index = torch.where(is_logit, torch.tensor([NONE if t is None else t for t in target_ids], dtype=torch.long)[bi], down_index)
    at = torch.full_like(bi, NONE) if pos is None else pos - first_real(mask).cpu()[bi]
    return dict(prompt_id=np.asarray(prompt_ids)[bi.numpy()],
                up_layer=attr(res.up, lambda n: n.layer, ui),
                up_type=attr(res.up, lambda n: node_type_code(n.node_type), ui),
                up_index=attr(res.up, lambda n: n.index, ui), up_pos=at,
                down_layer=attr(res.down, lambda n: n.layer, vi), down_type=down_type,
                down_index=down_index, down_pos=at,
                down_input=attr(res.down, lambda n: down_input_code(n.down_input), vi), value=values)


def node_edge_part(kept, prompt_ids, mask: torch.Tensor) -> dict:
    """Rows of `compute.node_edges.kept_inputs`."""
    offsets = first_real(mask).cpu()
    parts = []
    for res, chosen in kept:
        v, off = res.down, int(offsets[res.down.batch_index])
        for part, idx in chosen:
            k = len(idx)
            full = lambda x: np.full(k, x)  # noqa: E731
            parts.append(dict(
                prompt_id=full(prompt_ids[v.batch_index]), up_layer=full(part.layer),
                up_type=full(node_type_code(part.node_type)), up_index=part.index.cpu()[idx].numpy(),
                up_pos=(part.pos.cpu()[idx] - off).numpy(), down_layer=full(v.layer),
                down_type=full(node_type_code(v.node_type)), down_index=full(v.index),
                down_pos=full(v.pos - off), down_input=full(down_input_code(v.down_input)),
                value=_numpy(part.values.cpu()[idx], np.float32)))
    return _columns(parts, EDGE) if parts else {k: np.zeros(0, d) for k, d in EDGE.items()}


def edge_columns(parts: list[dict]) -> dict[str, np.ndarray]:
    """Edge parts (component graph first, then node-level edges) as one set of sorted columns."""
    return _columns([{k: _numpy(p[k], d) for k, d in EDGE.items()} for p in parts], EDGE)


def arrow_table(cols: dict[str, np.ndarray], run_id: int, scalar_names: tuple[str, ...] = ()) -> pa.Table:
    """Columns as the Arrow table the warehouse appends: codes become dictionary arrays, NONE
    becomes NULL."""
    dictionaries = {"node_type": NODE_TYPES, "up_type": NODE_TYPES, "down_type": NODE_TYPES,
                    "down_input": DOWN_INPUTS, "scalar": scalar_names}
    n = len(cols["value"])
    arrays = {"run_id": pa.array(np.full(n, run_id, dtype=np.int32))}
    for k, v in cols.items():
        mask = v == NONE if k in NULLABLE else None
        if k in dictionaries:
            arrays[k] = pa.DictionaryArray.from_arrays(pa.array(v, mask=mask),
                                                       pa.array(dictionaries[k]))
        else:
            arrays[k] = pa.array(v, mask=mask)
    return pa.table(arrays)


def prompt_table(run_id: int, chunk, metric, loss, corrupt_metric, to_target,
                 token_text: dict[int, str]) -> pa.Table:
    """One row per prompt of the batch, in prompt order. chunk: the runner's encoded prompts;
    the arrays: one value per prompt in chunk order (NaN: not computed); token_text: the text
    of every token id, targets included."""
    order = np.argsort([e.prompt_id for e in chunk], kind="stable")
    rows = [chunk[i] for i in order]
    f64 = lambda a: pa.array(np.asarray(a, np.float64)[order], from_pandas=True)  # noqa: E731
    return pa.table({
        "run_id": pa.array([run_id] * len(rows), pa.int32()),
        "prompt_id": pa.array([e.prompt_id for e in rows], pa.int32()),
        "text": [e.text for e in rows],
        "n_tokens": pa.array([len(e.ids) for e in rows], pa.int32()),
        "target_token_id": pa.array([e.target for e in rows], pa.int32()),
        "distractor_token_id": pa.array([e.distractor for e in rows], pa.int32()),
        "target_token": pa.array([None if e.target is None else token_text[e.target] for e in rows],
                                 pa.string()),
        "metric": f64(metric), "loss": f64(loss),
        "corrupt_metric": f64(corrupt_metric), "edges_to_target": f64(to_target),
    })


def token_table(run_id: int, chunk, token_text: dict[int, str]) -> pa.Table:
    """Every token of every prompt, positions from 0 at the first token."""
    rows = [(e.prompt_id, pos, t) for e in sorted(chunk, key=lambda e: e.prompt_id)
            for pos, t in enumerate(e.ids)]
    return pa.table({
        "run_id": pa.array([run_id] * len(rows), pa.int32()),
        "prompt_id": pa.array([r[0] for r in rows], pa.int32()),
        "position": pa.array([r[1] for r in rows], pa.int32()),
        "token_id": pa.array([r[2] for r in rows], pa.int32()),
        "token": [token_text[r[2]] for r in rows],
    })
