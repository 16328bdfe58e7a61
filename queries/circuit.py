"""Circuit filtering over stored edges: threshold, top-n, reachability and influence pruning.

Influence pruning follows circuit-tracer's conventions, so graphs pruned by either tool agree:
A[dst, src] = edge value; Â = |A| with each row normalised to sum 1; w = the target (logit)
nodes' weights; node influence = w·(Â + Â² + …) = w·((I − Â)⁻¹ − I). Cut at a cumulative
fraction t: sort scores descending, find the first index where the running sum reaches t of
the total, keep every score ≥ the score there. Nodes at t = 0.8 (tokens and targets always
kept), then edges at t = 0.98 on P̂ (Â restricted to kept nodes, rows renormalised):
score = P̂[dst, src] · (w·(P̂ + P̂² + …) + w)[dst]. Finally drop, until stable, every feature
node without a kept outgoing or incoming edge. Source nodes need only an outgoing one: error
nodes (they have no inputs) and any node with no incoming edge in the stored graph at all (a run
stores each prompt's top edges, so a head whose inputs were not among them is a source there, not
a dead end; on a full graph, as circuit-tracer prunes, only error nodes are such).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import polars as pl

from actwh.errors import ActwhError
from actwh.ontology import node_label

NODE_KEY = ("layer", "node_type", "node_index", "pos")
EXEMPT = ("embed", "logit")  # tokens and targets are never pruned


@dataclass
class Circuit:
    nodes: pl.DataFrame  # layer, node_type, node_index, pos, label (+ influence for that method)
    edges: pl.DataFrame  # up_* and down_* keys, down_input, value (+ score)

    def to_dot(self) -> str:
        lines = ["digraph circuit {", "  rankdir=BT;", "  node [shape=box, fontsize=10];"]
        for r in self.nodes.iter_rows(named=True):
            lines.append(f'  "{r["label"]}";')
        for r in self.edges.iter_rows(named=True):
            color = "blue" if r["value"] >= 0 else "red"
            lines.append(f'  "{r["up_label"]}" -> "{r["down_label"]}" '
                         f'[label="{r["value"]:.3g}", color={color}];')
        lines.append("}")
        return "\n".join(lines) + "\n"

    def to_json(self) -> dict:
        return {"nodes": self.nodes.to_dicts(), "edges": self.edges.to_dicts()}


def label(layer: int, node_type: str, index: int, pos, token: str | None = None) -> str:
    """The node's label (`actwh.ontology.node_label`, as SQL's `node_label`), `@pos` when the
    edges are per position."""
    base = node_label(layer, node_type, index, token)
    return base if pos is None else f"{base}@{pos}"


def _with_labels(edges: pl.DataFrame) -> pl.DataFrame:
    tokens = edges["target_token"] if "target_token" in edges.columns else [None] * edges.height
    up = [label(*r) for r in edges.select("up_layer", "up_type", "up_index", "up_pos").iter_rows()]
    down = [label(*r, t) for r, t in zip(
        edges.select("down_layer", "down_type", "down_index", "down_pos").iter_rows(), tokens)]
    return edges.with_columns(pl.Series("up_label", up, pl.String), pl.Series("down_label", down, pl.String))


def _nodes_of(edges: pl.DataFrame) -> pl.DataFrame:
    """The edges' nodes, each labelled (the target with its token, when the edges carry it)."""
    token = (pl.col("target_token") if "target_token" in edges.columns
             else pl.lit(None, pl.String)).alias("token")
    ups = edges.select(layer="up_layer", node_type="up_type", node_index="up_index", pos="up_pos",
                       token=pl.lit(None, pl.String))
    downs = edges.select(pl.col("down_layer").alias("layer"), pl.col("down_type").alias("node_type"),
                         pl.col("down_index").alias("node_index"), pl.col("down_pos").alias("pos"),
                         token)
    nodes = pl.concat([ups, downs]).unique(NODE_KEY, keep="last").sort(NODE_KEY, nulls_last=True)
    labels = [label(*r) for r in nodes.iter_rows()]
    return nodes.drop("token").with_columns(pl.Series("label", labels, pl.String))


def target_token(wh, run: int, prompt: int) -> str | None:
    """The text of the prompt's target token (None for the loss, or in a file made before
    actwh stored it)."""
    from actwh.queries.loader import Queries

    try:
        df = Queries()["target_token"](wh, run=run, prompt=prompt)
    except ActwhError:
        return None
    return df["target_token"][0] if df.height else None


def load_edges(wh, run: int, prompt: int) -> pl.DataFrame:
    """Every edge of one prompt, by the saved query `prompt_edges`, with the text of its target
    token (`target_token`) for labels."""
    from actwh.queries.loader import Queries

    df = Queries()["prompt_edges"](wh, run=run, prompt=prompt)
    if df.height == 0:
        raise ActwhError(f"run {run} has no edges for prompt {prompt} (populate with --edges)")
    return df.with_columns(pl.lit(target_token(wh, run, prompt), pl.String).alias("target_token"))


def threshold(edges: pl.DataFrame, value: float) -> Circuit:
    kept = _with_labels(edges.filter(pl.col("value").abs() >= value))
    return Circuit(_nodes_of(kept), kept)


def top_n(edges: pl.DataFrame, n: int) -> Circuit:
    kept = _with_labels(edges.sort(pl.col("value").abs(), descending=True).head(n))
    return Circuit(_nodes_of(kept), kept)


def reachable(wh, run: int, prompt: int, min_value: float = 0.0) -> Circuit:
    """Edges on a path back from the target, by the recursive CTE of `reachable_edges`."""
    from actwh.queries.loader import Queries

    df = Queries()["reachable_edges"](wh, run=run, prompt=prompt, threshold=min_value)
    df = df.with_columns(pl.col("up_type").cast(pl.String), pl.col("down_type").cast(pl.String),
                         pl.col("down_input").cast(pl.String),
                         pl.lit(target_token(wh, run, prompt), pl.String).alias("target_token"))
    kept = _with_labels(df)
    return Circuit(_nodes_of(kept), kept)


def cut(scores: np.ndarray, t: float) -> float:
    """The smallest score kept at cumulative fraction t (ties at the cut all kept)."""
    order = np.sort(scores)[::-1]
    total = order.sum()
    if total <= 0:
        return np.inf
    idx = int(np.searchsorted(np.cumsum(order) / total, t, side="left"))
    return float(order[min(idx, len(order) - 1)])


def normalise_rows(a: np.ndarray) -> np.ndarray:
    sums = a.sum(1, keepdims=True)
    return np.divide(a, sums, out=np.zeros_like(a), where=sums > 0)


def influence(a_hat: np.ndarray, w: np.ndarray) -> np.ndarray:
    """w·(Â + Â² + …) = w·((I − Â)⁻¹ − I), by one linear solve."""
    n = len(w)
    x = np.linalg.solve((np.eye(n) - a_hat).T, w)
    return x - w


def prune_matrix(a: np.ndarray, w: np.ndarray, node_types: list[str], node_t: float = 0.8,
                 edge_t: float = 0.98) -> tuple[np.ndarray, np.ndarray]:
    """Keep masks (nodes [n], edges [n, n] as [dst, src]) for an adjacency A[dst, src]."""
    a_hat = normalise_rows(np.abs(a))
    node_inf = influence(a_hat, w)
    exempt = np.array([t in EXEMPT for t in node_types])
    keep_nodes = (node_inf >= cut(node_inf, node_t)) | exempt
    p_hat = normalise_rows(a_hat * keep_nodes[:, None] * keep_nodes[None, :])
    edge_inf = influence(p_hat, w) + w
    scores = p_hat * edge_inf[:, None]
    keep_edges = (scores >= cut(scores[scores > 0], edge_t)) & (scores > 0)
    source = np.array([t == "sae_error" for t in node_types]) | ~(a != 0).any(1)
    while True:
        has_out = keep_edges.any(0)  # src column: some kept edge leaves the node
        has_in = keep_edges.any(1)
        drop = keep_nodes & ~exempt & (~has_out | (~has_in & ~source))
        if not drop.any():
            break
        keep_nodes &= ~drop
        keep_edges &= keep_nodes[:, None] & keep_nodes[None, :]
    return keep_nodes, keep_edges


def influence_prune(edges: pl.DataFrame, node_t: float = 0.8, edge_t: float = 0.98) -> Circuit:
    nodes = _nodes_of(edges)
    index = {tuple(r): i for i, r in enumerate(nodes.select(NODE_KEY).iter_rows())}
    n = len(index)
    a = np.zeros((n, n))
    src = [index[r] for r in edges.select("up_layer", "up_type", "up_index", "up_pos").iter_rows()]
    dst = [index[r] for r in edges.select("down_layer", "down_type", "down_index", "down_pos").iter_rows()]
    np.add.at(a, (dst, src), edges["value"].to_numpy())
    types = nodes["node_type"].to_list()
    w = np.array([1.0 if t == "logit" else 0.0 for t in types])
    keep_nodes, keep_edges = prune_matrix(a, w, types, node_t, edge_t)
    nodes = nodes.with_columns(pl.Series("influence", influence(normalise_rows(np.abs(a)), w)))
    kept = edges.filter(pl.Series(keep_edges[dst, src]))
    return Circuit(nodes.filter(pl.Series(keep_nodes)), _with_labels(kept))


METHODS = ("threshold", "top-n", "reachable", "influence")


def check_circuit_args(method, value, n, node_threshold, edge_threshold) -> None:
    import math

    if method not in METHODS:
        raise ActwhError(f"unknown circuit method {method!r}; valid: {', '.join(METHODS)}")
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ActwhError(f"-n must be a whole number >= 1, not {n!r}")
    if value is not None and not (math.isfinite(value) and value >= 0):
        raise ActwhError(f"--threshold must be a finite number >= 0, not {value!r}")
    for t, flag in ((node_threshold, "--node-threshold"), (edge_threshold, "--edge-threshold")):
        if not (math.isfinite(t) and 0 < t <= 1):
            raise ActwhError(f"{flag} is a cumulative fraction in (0, 1], not {t!r}")


def find_circuit(wh, run: int, prompt: int, method: str = "influence", value: float | None = None,
                 n: int = 50, node_threshold: float = 0.8, edge_threshold: float = 0.98) -> Circuit:
    check_circuit_args(method, value, n, node_threshold, edge_threshold)
    if hasattr(wh, "require_run"):
        wh.require_run(run)
    if method == "reachable":
        return reachable(wh, run, prompt, value or 0.0)
    edges = load_edges(wh, run, prompt)
    if method == "threshold":
        return threshold(edges, 0.01 if value is None else value)
    if method == "top-n":
        return top_n(edges, n)
    if method == "influence":
        return influence_prune(edges, node_threshold, edge_threshold)
    raise ActwhError(f"unknown circuit method {method!r}; valid: {', '.join(METHODS)}")
