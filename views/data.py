"""What the pictures show, fetched from the warehouse by saved queries (queries/*.sql) only.

Every function returns its data together with the queries that produced it (`Shown`: the saved
query's name, its SQL text and the bound parameters), so a page can put "the SQL that produced
this" one click away from every number. Nothing here writes: the Warehouse opens the file
read-only for each query and retries briefly while a populate holds it.
"""

from __future__ import annotations

import json
from contextlib import contextmanager
from dataclasses import dataclass, field

import polars as pl

from actwh.errors import ActwhError
from actwh.queries.circuit import METHODS, Circuit, find_circuit, label

# The token-level act × grad scalar a node type's histogram uses, in order of preference.
HIST_SCALARS = {
    "attn_head": ("attn_head_act_times_grad", "attn_act_times_grad"),
    "mlp_neuron": ("mlp_act_times_grad",),
    "mlp": ("mlp_layer_act_times_grad",),
    "embed": ("token_attribution",),
    "sae_latent": ("sae_act_times_grad",),
    "sae_error": ("sae_error_act_times_grad",),
}


class BadParameter(ActwhError):
    """A page, API or notebook call got a malformed or out-of-range parameter (HTTP 400)."""


class NotFound(ActwhError):
    """The run, prompt, head or node asked for is not in the warehouse (HTTP 404)."""


@dataclass
class Shown:
    """One query behind a picture: its name, SQL text and bound parameters."""

    name: str
    sql: str
    params: dict

    def to_json(self) -> dict:
        return {"name": self.name, "sql": self.sql, "params": self.params}


@dataclass
class Fetcher:
    """Runs saved queries on one warehouse and remembers each, for the page to show."""

    wh: object
    shown: list = field(default_factory=list)

    def __call__(self, name: str, **params) -> pl.DataFrame:
        saved = _queries()[name]
        bound = saved.bind(**params)
        self.shown.append(Shown(name, saved.sql, bound))
        return saved(self.wh, **params)

    def show(self, name: str, **params) -> None:
        """Record a saved query that library code (find_circuit) runs itself."""
        saved = _queries()[name]
        self.shown.append(Shown(name, saved.sql, saved.bind(**params)))

    def note(self, name: str, text: str, params: dict) -> None:
        """A step that is not SQL (circuit pruning in Python), shown beside the SQL."""
        self.shown.append(Shown(name, text, params))


_QUERIES: list = []


def _queries():
    from actwh.queries.loader import Queries

    if not _QUERIES:
        _QUERIES.append(Queries())
    return _QUERIES[0]


def open_warehouse(wh, wait_s: float = 10.0):
    """A Warehouse from a path, or the Warehouse given."""
    from actwh.warehouse.store import Warehouse

    return wh if hasattr(wh, "sql") else Warehouse(wh, wait_s=wait_s)


@contextmanager
def reading(wh, wait_s: float = 10.0):
    """A Warehouse holding one read-only connection for a page's several queries (opening the
    file costs more than a small query), closed at the end. Given a Warehouse, a copy of it pins
    its own connection (so one object can serve several threads), unless it already holds one."""
    import copy

    from actwh.warehouse.store import Warehouse

    if not isinstance(wh, Warehouse):
        wh = Warehouse(wh, wait_s=wait_s)
    elif getattr(wh, "_con", None) is not None:  # the caller's own long-lived connection
        yield wh
        return
    w = copy.copy(wh)
    try:
        w.relation(_queries()["view_open"].sql)  # pins the connection later queries reuse
        yield w
    finally:
        w.close()


# --- runs and prompts --------------------------------------------------------------------------

def run_info(f: Fetcher, run: int) -> dict:
    df = f("view_run", run=run)
    if df.height == 0:
        raise NotFound(f"no run {run} in the warehouse")
    info = df.row(0, named=True)
    info["scalar_list"] = [s for s in (info["scalars"] or "").split(",") if s]
    info["options"] = json.loads(info["options"]) if info["options"] else {}
    return info


def prompt_info(f: Fetcher, run: int, prompt: int) -> dict:
    df = f("view_prompt", run=run, prompt=prompt)
    if df.height == 0:
        raise NotFound(f"run {run} has no prompt {prompt}")
    return df.row(0, named=True)


def tokens(f: Fetcher, run: int, prompt: int) -> list[str]:
    return f("prompt_tokens_list", run=run, prompt=prompt)["token"].to_list()


SORTS = ("prompt_id", "metric", "loss", "n_tokens")


def prompts(f: Fetcher, run: int, search: str = "", sort: str = "prompt_id",
            descending: bool = False, k: int = 500) -> pl.DataFrame:
    if sort not in SORTS:
        raise BadParameter(f"sort must be one of {', '.join(SORTS)}, not {sort!r}")
    return f("view_prompts", run=run, search=search, sort=sort, descending=descending, k=k)


# --- token values ------------------------------------------------------------------------------

def token_choices(f: Fetcher, run: int, prompt: int) -> pl.DataFrame:
    return f("prompt_node_choices", run=run, prompt=prompt)


def token_values(f: Fetcher, run: int, prompt: int, scalar: str | None = None,
                 layer: int | None = None, node_index: int | None = None) -> dict:
    """A token-level scalar per position (summed over the chosen nodes), beside each token."""
    prompt_info(f, run, prompt)
    choices = token_choices(f, run, prompt)
    stored = choices["scalar"].unique(maintain_order=True).to_list()
    if scalar is None:
        scalar = "token_attribution" if "token_attribution" in stored else (stored[0] if stored else None)
    if scalar is None:
        raise NotFound(f"run {run} stores no token-level scalar for prompt {prompt}")
    if scalar not in stored:
        raise BadParameter(f"scalar {scalar!r} is not stored for run {run} prompt {prompt}; "
                           f"stored: {', '.join(stored)}")
    rows = f("token_values", run=run, prompt=prompt, scalar=scalar, layer=layer,
             node_index=node_index)
    return {"scalar": scalar, "layer": layer, "node_index": node_index, "rows": rows,
            "choices": choices}


# --- attention ---------------------------------------------------------------------------------

def attention(f: Fetcher, run: int, prompt: int, layer: int | None = None,
              head: int | None = None, scalar: str = "attn_pattern") -> dict:
    prompt_info(f, run, prompt)
    heads = f("attention_heads", run=run, prompt=prompt)
    stored = heads["scalar"].unique(maintain_order=True).to_list()
    if not stored:
        raise NotFound(f"run {run} stores no attention (pair_scalars) for prompt {prompt}")
    if scalar not in stored:
        raise BadParameter(f"pair scalar {scalar!r} is not stored for run {run} prompt {prompt}; "
                           f"stored: {', '.join(stored)}")
    mine = heads.filter(pl.col("scalar") == scalar)
    if layer is None or head is None:
        first = mine.row(0, named=True)
        layer = first["layer"] if layer is None else layer
        head = first["head"] if head is None else head
    if mine.filter((pl.col("layer") == layer) & (pl.col("head") == head)).height == 0:
        raise NotFound(f"run {run} prompt {prompt} has no {scalar} for layer {layer} head {head}")
    toks = tokens(f, run, prompt)
    cells = f("attention_cells", run=run, prompt=prompt, layer=layer, head=head, scalar=scalar)
    return {"layer": layer, "head": head, "scalar": scalar, "tokens": toks, "cells": cells,
            "heads": mine.select("layer", "head")}


# --- circuits ----------------------------------------------------------------------------------

@dataclass
class CircuitPicture:
    """A circuit with what drawing it needs: the prompt's tokens and a size per node."""

    circuit: Circuit
    run: int
    prompt: int
    method: str
    settings: dict
    tokens: list[str]
    token_ids: list[int]
    text: str
    n_layers: int | None

    @property
    def n_nodes(self) -> int:
        return self.circuit.nodes.height

    @property
    def n_edges(self) -> int:
        return self.circuit.edges.height


def circuit_settings(method: str, value: float | None, n: int, node_threshold: float,
                     edge_threshold: float) -> dict:
    if method not in METHODS:
        raise BadParameter(f"method must be one of {', '.join(METHODS)}, not {method!r}")
    if not (0 < node_threshold <= 1 and 0 < edge_threshold <= 1):
        raise BadParameter("node_threshold and edge_threshold must be in (0, 1]")
    if n < 1:
        raise BadParameter(f"n must be at least 1, not {n}")
    if value is not None and value < 0:
        raise BadParameter(f"threshold must be >= 0, not {value}")
    return {"value": value, "n": n, "node_threshold": node_threshold,
            "edge_threshold": edge_threshold}


def circuit(f: Fetcher, run: int, prompt: int, method: str = "influence",
            value: float | None = None, n: int = 50, node_threshold: float = 0.8,
            edge_threshold: float = 0.98) -> CircuitPicture:
    """`actwh.queries.circuit.find_circuit`'s circuit, exactly, with the prompt's tokens."""
    settings = circuit_settings(method, value, n, node_threshold, edge_threshold)
    info = run_info(f, run)
    p = prompt_info(f, run, prompt)
    toks = f("prompt_tokens_list", run=run, prompt=prompt)
    if method == "reachable":
        f.show("reachable_edges", run=run, prompt=prompt, threshold=value or 0.0)
    else:
        f.show("prompt_edges", run=run, prompt=prompt)
        step = {"threshold": f"keep edges with |value| >= {0.01 if value is None else value}",
                "top-n": f"keep the {n} edges with the largest |value|",
                "influence": f"influence pruning (circuit-tracer's rule): nodes at cumulative "
                             f"influence {node_threshold}, edges at {edge_threshold}"}[method]
        f.note(f"then, in Python: actwh.queries.circuit.find_circuit(method={method!r})", step,
               settings)
    found = find_circuit(f.wh, run, prompt, method, value, n, node_threshold, edge_threshold)
    return CircuitPicture(found, run, prompt, method, settings, toks["token"].to_list(),
                          toks["token_id"].to_list(), p["text"], info.get("n_layers"))


def stored_circuit(f: Fetcher, run: int, circuit_id: int, prompt: int | None = None) -> CircuitPicture:
    """A stored circuit (`actwh circuit --save`), read by id with the saved query
    `stored_circuit`, drawn over one of the prompts it was averaged over (its first by default)."""
    from actwh.queries.circuits import read_circuit

    info = run_info(f, run)
    try:
        stored = read_circuit(f.wh, circuit_id)
    except ActwhError:
        raise NotFound(f"no circuit {circuit_id} in the warehouse") from None
    if stored.run_id != run:
        raise NotFound(f"circuit {circuit_id} belongs to run {stored.run_id}, not {run}")
    f("stored_circuit", circuit=circuit_id)
    prompt = stored.prompts[0] if prompt is None else prompt
    p = prompt_info(f, run, prompt)
    toks = f("prompt_tokens_list", run=run, prompt=prompt)
    return CircuitPicture(stored.to_circuit(), run, prompt, f"stored circuit {circuit_id} ({stored.method})",
                          {"circuit": circuit_id, **stored.params}, toks["token"].to_list(),
                          toks["token_id"].to_list(), p["text"], info.get("n_layers"))


NODE_KEY = ("layer", "node_type", "node_index", "pos")


def node_key(layer, node_type, node_index, pos) -> str:
    return f"{layer}|{node_type}|{node_index}|{'' if pos is None else pos}"


def edge_key(r: dict) -> str:
    return (f"{node_key(r['up_layer'], r['up_type'], r['up_index'], r['up_pos'])}>"
            f"{node_key(r['down_layer'], r['down_type'], r['down_index'], r['down_pos'])}"
            f"{'.' + r['down_input'] if r.get('down_input') else ''}")


def node_detail(f: Fetcher, run: int, prompt: int, layer: int, node_type: str, node_index: int,
                pos: int | None, k: int = 10) -> dict:
    """A node's top in- and out-edges in one prompt, and its value in every prompt of the run."""
    if not 1 <= k <= 1000:
        raise BadParameter(f"k must be between 1 and 1000, not {k}")
    names = f("enum_names")
    types = names.filter(pl.col("kind") == "node_type")["name"].to_list()
    if node_type not in types:
        raise BadParameter(f"unknown node_type {node_type!r}; valid: {', '.join(types)}")
    info = run_info(f, run)
    prompt_info(f, run, prompt)
    args = dict(run=run, prompt=prompt, layer=layer, node_type=node_type, node_index=node_index,
                pos=pos, k=k)
    into = f("node_edges_in", **args)
    out = f("node_edges_out", **args)
    hist: dict = {"scalar": None, "values": [], "n_prompts": info["n_prompts"]}
    if node_type == "logit":
        metrics = f("prompt_metrics", run=run)
        hist.update(scalar=f"the run's target ({info['target']}) per prompt: prompts.metric",
                    values=[{"prompt_id": r["prompt_id"], "value": r["metric"]}
                            for r in metrics.iter_rows(named=True) if r["metric"] is not None])
    else:
        stored = [s for s in HIST_SCALARS.get(node_type, ()) if s in info["scalar_list"]]
        if stored:
            vals = f("node_value_by_prompt", run=run, layer=layer, node_type=node_type,
                     node_index=node_index, scalar=stored[0])
            hist.update(scalar=f"{stored[0]}, summed over positions",
                        values=vals.select("prompt_id", "value").to_dicts())
        else:
            hist["missing"] = (f"run {run} stores no token-level act × grad scalar for "
                               f"{node_type} nodes")
    return {"label": label(layer, node_type, node_index, pos),
            "node": {"layer": layer, "node_type": node_type, "node_index": node_index, "pos": pos},
            "in": into.to_dicts(), "out": out.to_dicts(), "hist": hist,
            "sql": [s.to_json() for s in f.shown]}


def compare(a: CircuitPicture, b: CircuitPicture) -> dict:
    """Edges present in one circuit only (keyed by both nodes, positions and q/k/v input)."""
    ka = {edge_key(r): r for r in a.circuit.edges.iter_rows(named=True)}
    kb = {edge_key(r): r for r in b.circuit.edges.iter_rows(named=True)}
    return {"only_a": [ka[k] for k in ka if k not in kb], "only_b": [kb[k] for k in kb if k not in ka],
            "both": sum(1 for k in ka if k in kb), "keys_a": set(ka) - set(kb),
            "keys_b": set(kb) - set(ka)}
