"""Saved queries against independent Polars computations; loader checks; circuit filtering."""

from __future__ import annotations

import random
import re
from collections import deque
from pathlib import Path

import duckdb
import numpy as np
import polars as pl
import pyarrow as pa
import pytest

from actwh.queries.circuit import cut, influence, influence_prune, prune_matrix
from actwh.queries.loader import QueryError, Queries, load_file
from actwh.runner import PopulateOptions, populate
from actwh.warehouse import Warehouse, WarehouseWriter
from actwh.compute.scalars import NODE_TYPES, SCALARS

from conftest import write_prompts

INDUCTION = [{"text": "red blue cat dog red blue cat dog red", "target": "blue"},
             {"text": "one two the a one two the a one", "target": "two"},
             {"text": "Mary John went Mary John went Mary", "target": "John"}]


def random_edges(run: int, prompt: int, rng: random.Random, n_layers=3, n_heads=3, density=0.5):
    """A random layered graph: embed -> heads/mlps (upstream by layer) -> logit."""
    nodes = [(-1, "embed", 0)] + [(L, t, i) for L in range(n_layers) for t, n in
                                  (("attn_head", n_heads), ("mlp", 1)) for i in range(n)]
    rows = []
    for d in nodes[1:] + [(n_layers, "logit", 7)]:
        for u in nodes:
            upstream = u[0] < d[0] or (u[0] == d[0] and u[1] == "attn_head" and d[1] == "mlp")
            if upstream and rng.random() < density:
                rows.append((run, prompt, *u, None, *d, None, None, rng.uniform(-1, 1)))
    names = ["run_id", "prompt_id", "up_layer", "up_type", "up_index", "up_pos", "down_layer",
             "down_type", "down_index", "down_pos", "down_input", "value"]
    cols = list(zip(*rows))
    types = {"run_id": pa.int32(), "prompt_id": pa.int32(), "up_layer": pa.int16(),
             "up_index": pa.int32(), "up_pos": pa.int32(), "down_layer": pa.int16(),
             "down_index": pa.int32(), "down_pos": pa.int32(), "value": pa.float32()}
    return pa.table({n: pa.array(c, types.get(n, pa.string())) for n, c in zip(names, cols)})


def positioned_edges(run: int, prompt: int, rng: random.Random, n_pos=4, width=3, p=0.2):
    """A random node-level graph: per-position nodes, several per (layer, type), edges from
    earlier layers at the same or an earlier position; the target only at the last position."""
    nodes = [(-1, "embed", 0, q) for q in range(n_pos)]
    nodes += [(L, t, i, q) for L in range(3) for t in ("attn_head", "mlp_neuron")
              for i in range(width) for q in range(n_pos)]
    downs = nodes[n_pos:] + [(3, "logit", 7, n_pos - 1)]
    rows = []
    for d in downs:
        for u in nodes:
            if u[0] < d[0] and u[3] <= d[3] and rng.random() < p:
                rows.append((run, prompt, *u, *d, "q" if d[1] == "attn_head" else None,
                             rng.uniform(-1, 1)))
    names = ["run_id", "prompt_id", "up_layer", "up_type", "up_index", "up_pos", "down_layer",
             "down_type", "down_index", "down_pos", "down_input", "value"]
    types = {"run_id": pa.int32(), "prompt_id": pa.int32(), "up_layer": pa.int16(),
             "up_index": pa.int32(), "up_pos": pa.int32(), "down_layer": pa.int16(),
             "down_index": pa.int32(), "down_pos": pa.int32(), "value": pa.float32()}
    return pa.table({n: pa.array(c, types.get(n, pa.string())) for n, c in zip(names, zip(*rows))})


IOI_ROWS_SHORT = [{"text": "the cat and the dog went to the store", "target": "cat", "distractor": "dog"},
                  {"text": "red blue red blue red", "target": "blue", "distractor": "red"}]


@pytest.fixture(scope="module")
def wh_path(tmp_path_factory, gpt2_dir):
    tmp = tmp_path_factory.mktemp("q")
    db = tmp / "wh.duckdb"
    ioi = write_prompts(tmp / "ioi.jsonl")
    ind = write_prompts(tmp / "ind.jsonl", INDUCTION)
    common = dict(model=str(gpt2_dir), batch_size=4)
    populate(db, PopulateOptions(prompts=str(ioi), target="logit_diff", select="top-k:6:mlp_act_times_grad",
                                 **common), progress=False)
    populate(db, PopulateOptions(prompts=str(ioi), target="logprob", select="top-k:6:mlp_act_times_grad",
                                 **common), progress=False)
    populate(db, PopulateOptions(prompts=str(ind), scalars=("attn_pattern", "attn_act_times_grad"),
                                 select="dense", **common), progress=False)
    # runs 4 and 5: every neuron at every position, two targets (compare_runs on repeated nodes)
    two = write_prompts(tmp / "two.jsonl", IOI_ROWS_SHORT)
    for target in ("logit_diff", "logprob"):
        populate(db, PopulateOptions(prompts=str(two), target=target, scalars=("mlp_act_times_grad",),
                                     select="dense", **common), progress=False)
    writer = WarehouseWriter(db, NODE_TYPES, tuple(SCALARS))
    rng = random.Random(0)
    empty = pa.table({"run_id": pa.array([], pa.int32()), "prompt_id": pa.array([], pa.int32()),
                      "text": pa.array([], pa.string()), "n_tokens": pa.array([], pa.int32())})
    for prompt in range(3):
        writer.append_batch(1, {"prompts": empty, "edges": random_edges(1, prompt, rng)})
    for prompt in (3, 4):  # node-level graphs: positions kept, many nodes that reach nothing
        writer.append_batch(1, {"prompts": empty, "edges": positioned_edges(1, prompt, rng)})
    return db


@pytest.fixture(scope="module")
def tables(wh_path):
    con = duckdb.connect(str(wh_path), read_only=True)
    queries = {"node_scalars": "SELECT * FROM node_scalars", "pair_scalars": "SELECT * FROM pair_scalars",
               "tokens": "SELECT * FROM tokens", "edges": "SELECT * FROM edges",
               "prompts": "SELECT * FROM prompts"}
    out = {}
    for t, sql in queries.items():
        df = con.sql(sql).pl()
        enums = [c for c in ("node_type", "scalar", "up_type", "down_type", "down_input") if c in df.columns]
        out[t] = df.with_columns([pl.col(c).cast(pl.String) for c in enums])
    con.close()
    return out


def by_abs(df, col="value"):
    return sorted(np.abs(df[col].to_numpy()).round(6).tolist(), reverse=True)


def test_top_nodes(wh_path, tables):
    q = Queries()
    got = q["top_nodes"](Warehouse(wh_path), run=1, prompt=0, k=5)
    n = tables["node_scalars"].filter((pl.col("run_id") == 1) & (pl.col("prompt_id") == 0)
                                       & (pl.col("scalar") == "mlp_act_times_grad"))
    want = n.sort(pl.col("value").abs(), descending=True).head(5)
    assert by_abs(got) == by_abs(want) and got.height == 5


def test_run_top_nodes(wh_path, tables):
    got = Queries()["run_top_nodes"](Warehouse(wh_path), run=1, k=100, per_prompt_k=3)
    n = tables["node_scalars"].filter((pl.col("run_id") == 1) & (pl.col("scalar") == "mlp_act_times_grad"))
    per = n.group_by("prompt_id", "layer", "node_type", "node_index").agg(pl.col("value").sum())
    per = per.with_columns(rank=pl.col("value").abs().rank("ordinal", descending=True).over("prompt_id"))
    want = per.group_by("layer", "node_type", "node_index").agg(
        n_prompts=pl.len(), mean_abs=pl.col("value").abs().mean(), max_abs=pl.col("value").abs().max(),
        n_top=(pl.col("rank") <= 3).sum())
    joined = got.join(want, on=["layer", "node_index"], suffix="_w")
    assert joined.height == want.height == got.height
    assert np.allclose(joined["mean_abs"], joined["mean_abs_w"], rtol=1e-6)
    assert np.allclose(joined["max_abs"], joined["max_abs_w"], rtol=1e-6)
    assert (joined["n_prompts"] == joined["n_prompts_w"]).all()
    assert joined["n_top"].sum() == joined["n_top_w"].sum()  # ties may swap which node ranks


def test_node_values_and_attention_pattern(wh_path, tables):
    wh, q = Warehouse(wh_path), Queries()
    n = tables["node_scalars"].filter((pl.col("run_id") == 1) & (pl.col("scalar") == "mlp_act_times_grad"))
    first = n.row(0, named=True)
    got = q["node_values"](wh, run=1, layer=first["layer"], node_type="mlp_neuron",
                           node_index=first["node_index"])
    want = n.filter((pl.col("layer") == first["layer"]) & (pl.col("node_index") == first["node_index"]))
    assert sorted(got["value"].to_list()) == sorted(want["value"].to_list())
    tok = tables["tokens"].filter(pl.col("run_id") == 1)
    for r in got.iter_rows(named=True):
        assert r["token"] == tok.filter((pl.col("prompt_id") == r["prompt_id"])
                                        & (pl.col("position") == r["position"]))["token"][0]
    got = q["attention_pattern"](wh, run=3, prompt=0, layer=1, head=2)
    p = tables["pair_scalars"].filter((pl.col("run_id") == 3) & (pl.col("prompt_id") == 0)
                                       & (pl.col("layer") == 1) & (pl.col("head") == 2)
                                       & (pl.col("scalar") == "attn_pattern"))
    assert got.height == p.height and np.allclose(sorted(got["attention"]), sorted(p["value"]))
    # each query row of a dense pattern sums to one
    assert np.allclose(got.group_by("query_pos").agg(pl.col("attention").sum())["attention"], 1, atol=1e-5)


def test_induction_and_previous_token_heads(wh_path, tables):
    wh, q = Warehouse(wh_path), Queries()
    p = tables["pair_scalars"].filter((pl.col("run_id") == 3) & (pl.col("scalar") == "attn_pattern"))
    tok = tables["tokens"].filter(pl.col("run_id") == 3)
    scores: dict = {}
    for pid in tok["prompt_id"].unique().to_list():
        ids = tok.filter(pl.col("prompt_id") == pid).sort("position")["token_id"].to_list()
        pp = p.filter(pl.col("prompt_id") == pid)
        lookup = {(r["layer"], r["head"], r["query_pos"], r["key_pos"]): r["value"]
                  for r in pp.iter_rows(named=True)}
        for (L, h) in {(r["layer"], r["head"]) for r in pp.iter_rows(named=True)}:
            for qpos in range(len(ids)):
                keys = [j + 1 for j in range(qpos - 1) if ids[j] == ids[qpos]]
                if keys:
                    scores.setdefault((L, h), []).append(sum(lookup[(L, h, qpos, k)] for k in keys))
    got = q["induction_heads"](wh, run=3, k=100)
    assert got.height == len(scores)
    for r in got.iter_rows(named=True):
        assert np.isclose(r["induction_score"], np.mean(scores[(r["layer"], r["head"])]), atol=1e-6)
    got = q["previous_token_heads"](wh, run=3, k=100)
    prev = p.filter((pl.col("query_pos") >= 1) & (pl.col("key_pos") == pl.col("query_pos") - 1))
    want = prev.group_by("layer", "head").agg(pl.col("value").mean())
    j = got.join(want, on=["layer", "head"])
    assert j.height == want.height and np.allclose(j["previous_token_score"], j["value"], atol=1e-6)


def test_compare_runs_and_prompt_metrics(wh_path, tables):
    wh, q = Warehouse(wh_path), Queries()
    got = q["compare_runs"](wh, run_a=1, run_b=2, k=1000)
    n = tables["node_scalars"].filter(pl.col("scalar") == "mlp_act_times_grad")
    key = ["prompt_id", "position", "layer", "node_type", "node_index"]
    want = n.filter(pl.col("run_id") == 1).join(n.filter(pl.col("run_id") == 2), on=key)
    assert got.height == want.height
    assert np.allclose(sorted(got["difference"]), sorted(want["value_right"] - want["value"]))
    got = q["prompt_metrics"](wh, run=1, other_run=2)
    pr = tables["prompts"]
    assert got.height == 6
    assert np.allclose(got["other_metric"], pr.filter(pl.col("run_id") == 2).sort("prompt_id")["metric"])


def test_edge_queries(wh_path, tables):
    wh, q = Warehouse(wh_path), Queries()
    e = tables["edges"].filter((pl.col("run_id") == 1) & (pl.col("prompt_id") == 1))
    assert by_abs(q["top_edges"](wh, run=1, prompt=1, k=7)) == by_abs(e.sort(pl.col("value").abs(), descending=True).head(7))
    into = q["edges_into"](wh, run=1, prompt=1, layer=1, node_type="mlp", node_index=0, k=100)
    assert by_abs(into) == by_abs(e.filter((pl.col("down_layer") == 1) & (pl.col("down_type") == "mlp")))
    out = q["edges_out_of"](wh, run=1, prompt=1, layer=0, node_type="attn_head", node_index=1, k=100)
    assert by_abs(out) == by_abs(e.filter((pl.col("up_layer") == 0) & (pl.col("up_type") == "attn_head")
                                          & (pl.col("up_index") == 1)))
    got = q["circuit"](wh, run=1, prompt=1, threshold=0.5)
    assert by_abs(got) == by_abs(e.filter(pl.col("value").abs() >= 0.5))


def bfs_reachable(edges: pl.DataFrame, threshold: float) -> set:
    kept = edges.filter(pl.col("value").abs() >= threshold)
    into: dict = {}
    for r in kept.iter_rows(named=True):
        d = (r["down_layer"], r["down_type"], r["down_index"])
        into.setdefault(d, []).append(r)
    start = {(r["down_layer"], r["down_type"], r["down_index"]) for r in kept.iter_rows(named=True)
             if r["down_type"] == "logit"}
    seen, queue, out = set(start), deque(start), set()
    while queue:
        node = queue.popleft()
        for r in into.get(node, []):
            out.add((r["up_layer"], r["up_type"], r["up_index"], *node))
            u = (r["up_layer"], r["up_type"], r["up_index"])
            if u not in seen:
                seen.add(u)
                queue.append(u)
    return out


@pytest.mark.parametrize("threshold", [0.0, 0.3, 0.6])
def test_reachability_cte_equals_bfs(wh_path, tables, threshold):
    wh, q = Warehouse(wh_path), Queries()
    for prompt in range(3):
        e = tables["edges"].filter((pl.col("run_id") == 1) & (pl.col("prompt_id") == prompt))
        got = q["reachable_edges"](wh, run=1, prompt=prompt, threshold=threshold)
        got_set = {(r["up_layer"], str(r["up_type"]), r["up_index"], r["down_layer"], str(r["down_type"]),
                    r["down_index"]) for r in got.iter_rows(named=True)}
        assert got_set == bfs_reachable(e, threshold)


def test_loader_rejects_undeclared_and_unused_parameters(tmp_path):
    f = tmp_path / "bad.sql"
    f.write_text("-- name: ok\n-- Fine.\n-- params: a\nSELECT $a;\n\n"
                 "-- name: undeclared\n-- Uses b.\n-- params: a\nSELECT $a, $b;\n")
    with pytest.raises(QueryError, match=rf"{re.escape(str(f))}:6: query undeclared uses undeclared parameter \$b"):
        load_file(f)
    f.write_text("-- name: unused\n-- Declares c.\n-- params: a, c = 1\nSELECT $a, '$c' -- $c\n")
    with pytest.raises(QueryError, match=rf"{re.escape(str(f))}:1: query unused declares unused parameter 'c'"):
        load_file(f)


def test_missing_and_unknown_parameters_are_named(wh_path):
    q = Queries()
    with pytest.raises(QueryError, match="needs parameter 'prompt'"):
        q["top_nodes"](Warehouse(wh_path), run=1)
    with pytest.raises(QueryError, match="has no parameter 'promt'.*prompt"):
        q["top_nodes"](Warehouse(wh_path), run=1, promt=1)


def test_every_saved_query_is_documented_and_declared():
    import inspect

    from actwh.queries import q

    for saved in Queries():
        assert saved.doc and saved.params is not None
        fn = getattr(q, saved.name)
        assert fn.__doc__.startswith(saved.doc)
        assert list(inspect.signature(fn).parameters)[1:] == [p for p, _ in saved.params]


def test_no_sql_is_built_from_user_values():
    root = Path(__file__).parents[1]
    pattern = re.compile(r"""(execute|sql|relation)\(\s*f["']|f["'](SELECT|INSERT|UPDATE|DELETE|WITH)\b"""
                         r"""|["'](SELECT|INSERT|UPDATE|DELETE)\b[^"']*["']\s*(%|\.format\()""")
    offenders = []
    for folder in ("compute", "warehouse", "queries", "cli", "actwh_pkg", "views"):
        for path in (root / folder).rglob("*.py"):
            for i, line in enumerate(path.read_text().splitlines(), 1):
                if pattern.search(line):
                    offenders.append(f"{path.name}:{i}: {line.strip()}")
    assert not offenders, offenders


# --- influence pruning on hand-built graphs -------------------------------------------------

def test_influence_matches_closed_form():
    rng = np.random.default_rng(0)
    a = np.tril(rng.random((6, 6)), -1).T  # a DAG: dst index < src index
    a_hat = a / np.where(a.sum(1, keepdims=True) > 0, a.sum(1, keepdims=True), 1)
    w = np.array([1.0, 0, 0, 0, 0, 0])
    series = sum(w @ np.linalg.matrix_power(a_hat, k) for k in range(1, 7))
    assert np.allclose(influence(a_hat, w), series)
    assert np.allclose(influence(a_hat, w), w @ (np.linalg.inv(np.eye(6) - a_hat) - np.eye(6)))


def test_cut_keeps_ties_and_reaches_fraction():
    assert cut(np.array([5.0, 3, 1, 1]), 0.8) == 3.0
    assert cut(np.array([4.0, 2, 2, 2]), 0.6) == 2.0  # ties at the cut all kept


def test_chain_keeps_everything_on_the_path():
    # emb -> n1 -> n2 -> logit, indices [logit, n2, n1, emb]
    a = np.zeros((4, 4))
    a[0, 1], a[1, 2], a[2, 3] = 1.0, 0.5, 2.0
    nodes, edges = prune_matrix(a, np.array([1.0, 0, 0, 0]), ["logit", "mlp", "mlp", "embed"])
    assert nodes.all() and edges.sum() == 3


def test_node_without_path_to_target_is_dropped():
    # logit <- n1 <- emb ; n2 <- emb, n2 feeds nothing that reaches the logit
    a = np.zeros((4, 4))  # [logit, n1, n2, emb]
    a[0, 1], a[1, 3], a[2, 3] = 1.0, 1.0, 5.0
    nodes, edges = prune_matrix(a, np.array([1.0, 0, 0, 0]), ["logit", "mlp", "mlp", "embed"])
    assert nodes.tolist() == [True, True, False, True]
    assert not edges[2].any() and edges[0, 1] and edges[1, 3]


def test_diamond_drops_the_weak_branch():
    # logit <- strong (0.95) and weak (0.05); both fed by emb
    a = np.zeros((4, 4))  # [logit, strong, weak, emb]
    a[0, 1], a[0, 2], a[1, 3], a[2, 3] = 0.95, 0.05, 1.0, 1.0
    nodes, edges = prune_matrix(a, np.array([1.0, 0, 0, 0]), ["logit", "attn_head", "attn_head", "embed"],
                                node_t=0.8, edge_t=0.98)
    assert nodes.tolist() == [True, True, False, True]
    assert edges[0, 1] and not edges[0, 2] and not edges[2, 3]


def test_influence_prune_on_dataframe_keeps_connected_nodes():
    edges = pl.DataFrame({
        "up_layer": [-1, 0, -1, 0], "up_type": ["embed", "mlp", "embed", "attn_head"],
        "up_index": [0, 0, 0, 1], "up_pos": [None] * 4, "down_layer": [0, 2, 0, 2],
        "down_type": ["mlp", "logit", "attn_head", "logit"], "down_index": [0, 5, 1, 5],
        "down_pos": [None] * 4, "down_input": [None] * 4, "value": [1.0, 0.97, 1.0, 0.03]},
        schema_overrides={"up_pos": pl.Int32, "down_pos": pl.Int32, "down_input": pl.String})
    c = influence_prune(edges)
    assert set(c.nodes["label"]) == {"emb", "L0.mlp", "logit5"}
    assert c.to_dot().count("->") == c.edges.height == 2


def test_cli_query_errors_are_one_line_and_circuit_writes_dot(wh_path, tmp_path):
    from click.testing import CliRunner

    from actwh.cli.main import cli

    runner = CliRunner()
    r = runner.invoke(cli, ["query", "top_nodez", "--db", str(wh_path)])
    assert r.exit_code != 0 and "unknown query 'top_nodez'" in r.output and "top_nodes" in r.output
    r = runner.invoke(cli, ["query", "top_nodes", "-p", "run=1", "--db", str(wh_path)])
    assert r.exit_code != 0 and "needs parameter 'prompt'" in r.output
    assert len(r.output.strip().splitlines()) == 1
    r = runner.invoke(cli, ["query", "top_nodes", "-p", "run=1", "-p", "prompt=0", "-p", "k=3",
                            "--db", str(wh_path), "--format", "csv"])
    assert r.exit_code == 0 and len(r.output.strip().splitlines()) == 4
    dot = tmp_path / "c.dot"
    r = runner.invoke(cli, ["circuit", "1", "0", "--method", "reachable", "--threshold", "0.5",
                            "--dot", str(dot), "--db", str(wh_path)])
    assert r.exit_code == 0, r.output
    assert dot.read_text().startswith("digraph circuit")
    r = runner.invoke(cli, ["queries"])
    assert r.exit_code == 0 and "induction_heads(run" in r.output


def test_run_top_attributions(wh_path, tables):
    got = Queries()["run_top_attributions"](Warehouse(wh_path), run=1, k=1000)
    n = tables["node_scalars"].filter((pl.col("run_id") == 1) & pl.col("scalar").str.contains("times_grad|token_attr"))
    per = n.group_by("prompt_id", "layer", "node_type", "node_index", "scalar").agg(pl.col("value").sum())
    want = per.group_by("layer", "node_type", "node_index", "scalar").agg(
        mean_abs=pl.col("value").abs().sum() / 6, n=pl.len())
    assert got.height == want.height
    assert np.allclose(sorted(got["mean_abs"]), sorted(want["mean_abs"]), rtol=1e-6)
    assert got["mean_abs"].to_list() == sorted(got["mean_abs"].to_list(), reverse=True)


def bfs_reachable_nodes(edges: pl.DataFrame, threshold: float, key=lambda layer, t, i, pos: (layer, t, i, pos)):
    """Edges on a path back from the target, nodes identified by `key` (default: the full key)."""
    kept = edges.filter(pl.col("value").abs() >= threshold)
    into: dict = {}
    for r in kept.iter_rows(named=True):
        into.setdefault(key(r["down_layer"], r["down_type"], r["down_index"], r["down_pos"]), []).append(r)
    start = {key(r["down_layer"], r["down_type"], r["down_index"], r["down_pos"])
             for r in kept.iter_rows(named=True) if r["down_type"] == "logit"}
    seen, queue, out = set(start), deque(start), set()
    while queue:
        node = queue.popleft()
        for r in into.get(node, []):
            out.add((r["up_layer"], r["up_type"], r["up_index"], r["up_pos"], r["down_layer"],
                     r["down_type"], r["down_index"], r["down_pos"]))
            u = key(r["up_layer"], r["up_type"], r["up_index"], r["up_pos"])
            if u not in seen:
                seen.add(u)
                queue.append(u)
    return out


@pytest.mark.parametrize("threshold", [0.0, 0.4])
def test_reachability_keeps_positions_and_node_indices_apart(wh_path, tables, threshold):
    wh, q = Warehouse(wh_path), Queries()
    for prompt in (3, 4):
        e = tables["edges"].filter((pl.col("run_id") == 1) & (pl.col("prompt_id") == prompt))
        want = bfs_reachable_nodes(e, threshold)
        # the fixture can tell: forgetting the position or the index reaches more edges
        assert want != bfs_reachable_nodes(e, threshold, lambda L, t, i, p: (L, t, i))
        assert want != bfs_reachable_nodes(e, threshold, lambda L, t, i, p: (L, t, p))
        assert 0 < len(want) < e.filter(pl.col("value").abs() >= threshold).height
        got = q["reachable_edges"](wh, run=1, prompt=prompt, threshold=threshold)
        got_set = {(r["up_layer"], str(r["up_type"]), r["up_index"], r["up_pos"], r["down_layer"],
                    str(r["down_type"]), r["down_index"], r["down_pos"]) for r in got.iter_rows(named=True)}
        assert got.height == len(got_set) and got_set == want


def test_pairs_view_names_the_query_and_the_key_token(wh_path, tables):
    tok = {(r["run_id"], r["prompt_id"], r["position"]): r["token"]
           for r in tables["tokens"].iter_rows(named=True)}
    got = Warehouse(wh_path).sql("SELECT run_id, prompt_id, query_pos, query_token, key_pos, key_token "
                                 "FROM pairs WHERE run_id = 3")
    assert got.height == tables["pair_scalars"].filter(pl.col("run_id") == 3).height
    differ = 0
    for r in got.iter_rows(named=True):
        assert r["query_token"] == tok[(3, r["prompt_id"], r["query_pos"])]
        assert r["key_token"] == tok[(3, r["prompt_id"], r["key_pos"])]
        differ += r["query_token"] != r["key_token"]
    assert differ > 0  # a join on the wrong position would show


def test_compare_runs_matches_nodes_at_the_same_position(wh_path, tables):
    got = Queries()["compare_runs"](Warehouse(wh_path), run_a=4, run_b=5, k=100_000)
    n = tables["node_scalars"].filter(pl.col("scalar") == "mlp_act_times_grad")
    key = ["prompt_id", "position", "layer", "node_type", "node_index"]
    a, b = n.filter(pl.col("run_id") == 4), n.filter(pl.col("run_id") == 5)
    assert a.height > a.unique(["prompt_id", "layer", "node_index"]).height  # nodes repeat by position
    want = {tuple(r[k] for k in key): (r["value"], r["value_b"])
            for r in a.join(b, on=key, suffix="_b").iter_rows(named=True)}
    assert got.height == len(want) == a.height
    for r in got.iter_rows(named=True):
        va, vb = want[tuple(str(r[k]) if k == "node_type" else r[k] for k in key)]
        assert (r["value_a"], r["value_b"]) == (va, vb)
        assert r["difference"] == pytest.approx(vb - va, abs=1e-6)
