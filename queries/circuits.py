"""Circuits over datasets and stored circuits.

`dataset_circuit` averages a run's component-graph edges over prompts (the mean, as EAP-IG's
graphs are: an edge a prompt did not store counts as 0 for that prompt) before filtering them
with the same methods as one prompt's circuit (threshold, top-n, influence). The target node
of the averaged graph is one node (`logit`, index -1) whatever each prompt's target token.
`save_circuit` stores a circuit in the `circuits` table (method, thresholds, prompts, kept nodes
and edges as JSON); `read_circuit` reads it back by id, for `actwh evaluate --circuit ID`, the
saved queries and the views.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import polars as pl

from actwh.errors import ActwhError

AGGREGATE_METHODS = ("threshold", "top-n", "influence")
EDGE_KEY = ("up_layer", "up_type", "up_index", "down_layer", "down_type", "down_index",
            "down_input")


def mean_edges(wh, run: int, prompt_ids: list[int] | None) -> tuple[pl.DataFrame, list[int]]:
    """The run's component edges (summed over positions) averaged over `prompt_ids` (None: all
    the run's prompts), and the prompt ids averaged over."""
    from actwh.evaluate import COMPONENT_TYPES

    ids = wh.sql("SELECT prompt_id FROM prompts WHERE run_id = $run ORDER BY prompt_id",
                 run=run)["prompt_id"].to_list()
    if not ids:
        raise ActwhError(f"run {run} has no prompts")
    if prompt_ids is not None:
        missing = [p for p in prompt_ids if p not in set(ids)]
        if missing:
            raise ActwhError(f"run {run} has no prompt {missing[0]}")
        ids = sorted(set(prompt_ids))
    df = wh.sql(
        "SELECT up_layer, up_type::VARCHAR AS up_type, up_index, CAST(NULL AS INTEGER) AS up_pos, "
        "down_layer, down_type::VARCHAR AS down_type, "
        "CASE WHEN down_type::VARCHAR = 'logit' THEN -1 ELSE down_index END AS down_index, "
        "CAST(NULL AS INTEGER) AS down_pos, down_input::VARCHAR AS down_input, "
        "sum(value)::DOUBLE / $n AS value, count(*) AS n_prompts "
        "FROM edges WHERE run_id = $run AND up_pos IS NULL AND down_pos IS NULL "
        "AND list_contains($ups, up_type::VARCHAR) "
        "AND down_type::VARCHAR IN ('attn_head', 'mlp', 'logit') "
        "AND list_contains($prompts, prompt_id) "
        "GROUP BY ALL ORDER BY up_layer, up_type, up_index, down_layer, down_type, down_index, "
        "down_input", run=run, prompts=ids, n=len(ids), ups=list(COMPONENT_TYPES))
    if df.height == 0:
        raise ActwhError(f"run {run} has no component edges for those prompts; populate with "
                         "--edges")
    return df, ids


def dataset_circuit(wh, run: int, prompt_ids: list[int] | None, method: str = "influence",
                    value: float | None = None, n: int = 50, node_threshold: float = 0.8,
                    edge_threshold: float = 0.98):
    """A circuit from edges averaged over prompts; returns (Circuit, prompt ids)."""
    from actwh.queries.circuit import influence_prune, threshold, top_n

    if method not in AGGREGATE_METHODS:
        raise ActwhError(f"a circuit over prompts uses {', '.join(AGGREGATE_METHODS)}, "
                         f"not {method!r}")
    edges, ids = mean_edges(wh, run, prompt_ids)
    edges = edges.drop("n_prompts")
    if method == "threshold":
        return threshold(edges, 0.01 if value is None else value), ids
    if method == "top-n":
        return top_n(edges, n), ids
    return influence_prune(edges, node_threshold, edge_threshold), ids


@dataclass
class StoredCircuit:
    circuit_id: int
    run_id: int
    method: str
    params: dict
    prompts: list[int]
    edges: pl.DataFrame  # EDGE_KEY columns and value

    def mask(self, index):
        """Its keep mask over a model's component graph (`actwh.evaluate.EdgeIndex`)."""
        return index.mask(self.edges)

    def to_circuit(self):
        """As a `Circuit` (labelled nodes and edges, positions summed), for drawing and export."""
        from actwh.queries.circuit import Circuit, _nodes_of, _with_labels

        edges = self.edges.with_columns(pl.lit(None, pl.Int64).alias("up_pos"),
                                        pl.lit(None, pl.Int64).alias("down_pos"))
        return Circuit(_nodes_of(edges), _with_labels(edges))


def save_circuit(db, run: int, circuit, method: str, params: dict, prompts: list[int]) -> int:
    """Store a circuit; returns its id."""
    from actwh.compute.scalars import NODE_TYPES, SCALARS
    from actwh.warehouse.schema import create_missing_tables
    from actwh.warehouse.store import WarehouseWriter, _now

    edges = circuit.edges.select(*EDGE_KEY, "value")
    nodes = circuit.nodes.select("layer", "node_type", "node_index")
    writer = WarehouseWriter(db, NODE_TYPES, tuple(SCALARS))
    with writer.transaction() as con:
        create_missing_tables(con)
        cid = con.execute("SELECT coalesce(max(circuit_id), 0) + 1 FROM circuits").fetchone()[0]
        con.execute("INSERT INTO circuits VALUES ($id, $run, $method, $params, $prompts, $n_edges, "
                    "$n_nodes, $nodes, $edges, $at)",
                    {"id": cid, "run": run, "method": method, "params": json.dumps(params),
                     "prompts": json.dumps(prompts), "n_edges": edges.height,
                     "n_nodes": nodes.height, "nodes": json.dumps(nodes.to_dicts()),
                     "edges": json.dumps(edges.to_dicts()), "at": _now()})
    return cid


def read_circuit(wh, circuit_id: int) -> StoredCircuit:
    try:
        df = wh.sql("SELECT * FROM circuits WHERE circuit_id = $id", id=circuit_id)
    except ActwhError:
        df = None
    if df is None or df.height == 0:
        raise ActwhError(f"no circuit {circuit_id} in {wh.path}")
    r = df.row(0, named=True)
    load = lambda v: json.loads(v) if isinstance(v, str) else v  # noqa: E731
    edges = pl.DataFrame(load(r["edges"]), schema={
        "up_layer": pl.Int64, "up_type": pl.String, "up_index": pl.Int64, "down_layer": pl.Int64,
        "down_type": pl.String, "down_index": pl.Int64, "down_input": pl.String,
        "value": pl.Float64})
    return StoredCircuit(r["circuit_id"], r["run_id"], r["method"], load(r["params"]),
                         load(r["prompts"]), edges)
