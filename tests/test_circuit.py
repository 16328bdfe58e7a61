"""Influence pruning through `find_circuit`, against an independent implementation of the rules
documented in queries/circuit.py (circuit-tracer's): node influence by an explicit power series,
cuts at cumulative fractions, separate node and edge thresholds, exempt tokens and targets,
and error nodes that need only an outgoing edge. No torch here: mutation runs stay quick."""

from __future__ import annotations

import random
import re

import numpy as np
import pyarrow as pa
import pytest

from actwh.ontology import NODE_TYPES
from actwh.queries.circuit import find_circuit
from actwh.warehouse import Warehouse, WarehouseWriter


def graph(rng: random.Random, n_pos=3, width=3, p=0.3):
    """A node-level graph with positions: embeddings, heads, neurons, SAE latents and error nodes
    (which, as in real node-level edges, have no incoming edges), and the target; some nodes
    reach nothing."""
    nodes = [(-1, "embed", 0, q) for q in range(n_pos)]
    for L in range(3):
        nodes += [(L, t, i, q) for t in ("attn_head", "sae_latent") for i in range(width)
                  for q in range(n_pos)]
        nodes += [(L, "sae_error", 0, q) for q in range(n_pos)]
    target = (3, "logit", 5, n_pos - 1)
    edges = []
    for d in [n for n in nodes if n[1] not in ("embed", "sae_error")] + [target]:
        for u in nodes:
            if u[0] < d[0] and u[3] <= d[3] and rng.random() < (3 * p if u[1] == "sae_error" else p):
                edges.append((u, d, rng.uniform(-1, 1) * (3 if u[1] == "sae_error" else 1)))
    return edges


def reference_prune(edges, node_t, edge_t):
    """(kept nodes, kept (up, down) edges), written from the documented rules."""
    nodes = sorted({e[0] for e in edges} | {e[1] for e in edges}, key=str)
    ix = {n: i for i, n in enumerate(nodes)}
    n = len(nodes)
    a = np.zeros((n, n))
    for u, d, v in edges:
        a[ix[d], ix[u]] += v

    def normalise(m):
        s = m.sum(1, keepdims=True)
        return np.where(s > 0, m / np.where(s > 0, s, 1), 0)

    def series(m, w):  # w·(M + M² + … ), exact for a DAG after n terms
        out, term = np.zeros(n), w.copy()
        for _ in range(n):
            term = term @ m
            out += term
        return out

    def cut(scores, t):
        s = np.sort(scores)[::-1]
        if s.sum() <= 0:
            return np.inf
        hit = np.flatnonzero(np.cumsum(s) / s.sum() >= t)  # first index reaching t of the total
        return s[hit[0] if len(hit) else -1]

    w = np.array([1.0 if x[1] == "logit" else 0.0 for x in nodes])
    exempt = np.array([x[1] in ("embed", "logit") for x in nodes])
    # sources need no kept incoming edge: error nodes, and nodes no stored edge leads into
    error = np.array([x[1] == "sae_error" or not any(d == x for _, d, _ in edges) for x in nodes])
    a_hat = normalise(np.abs(a))
    infl = series(a_hat, w)
    keep = (infl >= cut(infl, node_t)) | exempt
    p_hat = normalise(a_hat * keep[:, None] * keep[None, :])
    score = p_hat * (series(p_hat, w) + w)[:, None]
    keep_e = (score >= cut(score[score > 0], edge_t)) & (score > 0)
    while True:
        out_, in_ = keep_e.any(0), keep_e.any(1)
        drop = keep & ~exempt & (~out_ | (~in_ & ~error))
        if not drop.any():
            break
        keep &= ~drop
        keep_e &= keep[:, None] & keep[None, :]
    kept_nodes = {x for x, k in zip(nodes, keep) if k}
    kept_edges = {(u, d) for u, d, _ in edges if keep_e[ix[d], ix[u]]}
    reference_prune.influence = dict(zip(nodes, infl))
    return kept_nodes, kept_edges


@pytest.fixture(scope="module")
def stored(tmp_path_factory):
    db = tmp_path_factory.mktemp("circuit") / "wh.duckdb"
    writer = WarehouseWriter(db, NODE_TYPES, ("mlp_post_act",))
    model = writer.register_model(dict(
        name="graphs", source="test_circuit", weights_sha256="0" * 64, arch="gpt2", n_layers=3,
        n_heads=3, d_model=8, d_head=4, d_mlp=8, d_vocab=48, n_ctx=16, config={}))
    writer.create_run(model, name="graphs", target="logit", scalars="mlp_post_act",
                      selection="dense", code_version="test", device="cpu", dtype="float32",
                      n_prompts=5, options={})
    rng = random.Random(11)
    graphs = {}
    def prompt_rows(ids):
        return pa.table({"run_id": pa.array([1] * len(ids), pa.int32()),
                         "prompt_id": pa.array(ids, pa.int32()),
                         "text": pa.array([f"prompt {i}" for i in ids], pa.string()),
                         "n_tokens": pa.array([3] * len(ids), pa.int32())})
    writer.append_batch(1, {"prompts": prompt_rows([4])})  # a prompt without edges
    for prompt in range(4):
        edges = graph(rng)
        graphs[prompt] = edges
        cols = list(zip(*[(1, prompt, *u, *d, None, v) for u, d, v in edges]))
        names = ["run_id", "prompt_id", "up_layer", "up_type", "up_index", "up_pos", "down_layer",
                 "down_type", "down_index", "down_pos", "down_input", "value"]
        types = {"run_id": pa.int32(), "prompt_id": pa.int32(), "up_layer": pa.int16(),
                 "up_index": pa.int32(), "up_pos": pa.int32(), "down_layer": pa.int16(),
                 "down_index": pa.int32(), "down_pos": pa.int32(), "value": pa.float32()}
        writer.append_batch(1, {"prompts": prompt_rows([prompt]), "edges": pa.table(
            {k: pa.array(c, types.get(k, pa.string())) for k, c in zip(names, cols)})})
    # the stored values are float32: the reference sees what find_circuit sees
    graphs = {k: [(u, d, float(np.float32(v))) for u, d, v in g] for k, g in graphs.items()}
    return db, graphs


@pytest.mark.parametrize("node_t,edge_t", [(0.8, 0.98), (0.5, 0.9), (0.95, 0.6), (0.6, 0.95)])
def test_influence_pruning_equals_the_documented_rules(stored, node_t, edge_t):
    db, graphs = stored
    wh = Warehouse(db)
    for prompt, edges in graphs.items():
        want_nodes, want_edges = reference_prune(edges, node_t, edge_t)
        c = find_circuit(wh, 1, prompt, "influence", node_threshold=node_t, edge_threshold=edge_t)
        key = ("layer", "node_type", "node_index", "pos")
        got_nodes = {tuple(r[k] for k in key) for r in c.nodes.iter_rows(named=True)}
        got_edges = {((r["up_layer"], r["up_type"], r["up_index"], r["up_pos"]),
                      (r["down_layer"], r["down_type"], r["down_index"], r["down_pos"]))
                     for r in c.edges.iter_rows(named=True)}
        assert got_nodes == want_nodes, prompt
        assert got_edges == want_edges, prompt
        for r in c.nodes.iter_rows(named=True):  # each kept node's influence, as the series gives it
            want = reference_prune.influence[tuple(r[k] for k in key)]
            assert r["influence"] == pytest.approx(want, abs=1e-9)


def test_the_fixture_can_tell_the_rules_apart(stored):
    """Swapped thresholds, or error nodes held to the incoming-edge rule, change the answer."""
    _, graphs = stored
    swapped = sum(reference_prune(e, 0.95, 0.6) != reference_prune(e, 0.6, 0.95) for e in graphs.values())
    assert swapped >= 2
    kept_errors = 0
    for edges in graphs.values():
        nodes, _ = reference_prune(edges, 0.8, 0.98)
        kept_errors += sum(n[1] == "sae_error" for n in nodes)
        assert any(n[1] in ("attn_head", "sae_latent") for n in nodes)
        assert len(nodes) < len({e[0] for e in edges} | {e[1] for e in edges})  # some are pruned
    assert kept_errors > 0  # error nodes (no incoming edges) survive only by their own rule
    # heads and latents no stored edge leads into: kept as sources (with an outgoing edge)
    sources = 0
    for edges in graphs.values():
        nodes, _ = reference_prune(edges, 0.8, 0.98)
        downs = {d for _, d, _ in edges}
        sources += sum(n[1] in ("attn_head", "sae_latent") and n not in downs for n in nodes)
    assert sources > 0


def keys(c):
    return {((r["up_layer"], r["up_type"], r["up_index"], r["up_pos"]),
             (r["down_layer"], r["down_type"], r["down_index"], r["down_pos"]))
            for r in c.edges.iter_rows(named=True)}


def ends(edge_keys):
    return {n for e in edge_keys for n in e}


def node_keys(c):
    return {(r["layer"], r["node_type"], r["node_index"], r["pos"]) for r in c.nodes.iter_rows(named=True)}


def test_threshold_top_n_and_reachable_methods(stored):
    db, graphs = stored
    wh = Warehouse(db)
    for prompt, edges in graphs.items():
        want = {(u, d) for u, d, v in edges if abs(v) >= 0.5}
        c = find_circuit(wh, 1, prompt, "threshold", value=0.5)
        assert keys(c) == want and node_keys(c) == ends(want)
        assert keys(find_circuit(wh, 1, prompt, "threshold")) == {(u, d) for u, d, v in edges
                                                                  if abs(v) >= 0.01}
        ranked = sorted(edges, key=lambda e: -abs(e[2]))
        c = find_circuit(wh, 1, prompt, "top-n", n=7)
        assert keys(c) == {(u, d) for u, d, _ in ranked[:7]} and node_keys(c) == ends(keys(c))
        # reachable: a walk back from the target over edges with |value| >= 0.3
        into = {}
        for u, d, v in edges:
            if abs(v) >= 0.3:
                into.setdefault(d, []).append(u)
        todo = [d for _, d, v in edges if d[1] == "logit" and abs(v) >= 0.3]
        seen, found = set(todo), set()
        while todo:
            d = todo.pop()
            for u in into.get(d, []):
                found.add((u, d))
                if u not in seen:
                    seen.add(u)
                    todo.append(u)
        c = find_circuit(wh, 1, prompt, "reachable", value=0.3)
        assert keys(c) == found and node_keys(c) == ends(found)
        assert 0 < len(found) < len([e for e in edges if abs(e[2]) >= 0.3])


def test_labels_dot_and_json(stored):
    db, graphs = stored
    c = find_circuit(Warehouse(db), 1, 0, "top-n", n=5)
    labels = {"embed": "emb", "attn_head": "L{0}H{2}", "sae_latent": "L{0}F{2}",
              "sae_error": "L{0}.err", "logit": "logit{2}"}

    def lab(k):
        return labels[k[1]].format(*k) + f"@{k[3]}"
    assert set(c.nodes["label"]) == {lab(k) for k in node_keys(c)}
    for r in c.edges.iter_rows(named=True):
        assert r["up_label"] == lab((r["up_layer"], r["up_type"], r["up_index"], r["up_pos"]))
        assert r["down_label"] == lab((r["down_layer"], r["down_type"], r["down_index"], r["down_pos"]))
    dot = c.to_dot().splitlines()
    assert dot[:3] == ["digraph circuit {", "  rankdir=BT;", "  node [shape=box, fontsize=10];"]
    assert dot[-1] == "}" and c.to_dot().endswith("}\n")
    assert sorted(dot[3:3 + c.nodes.height]) == sorted(f'  "{x}";' for x in c.nodes["label"])
    want = sorted(f'  "{r["up_label"]}" -> "{r["down_label"]}" [label="{r["value"]:.3g}", '
                  f'color={"blue" if r["value"] >= 0 else "red"}];' for r in c.edges.iter_rows(named=True))
    assert sorted(dot[3 + c.nodes.height:-1]) == want
    assert {"blue", "red"} <= {x.split("color=")[1][:-2] for x in want}  # both signs shown
    j = c.to_json()
    assert len(j["nodes"]) == c.nodes.height and len(j["edges"]) == 5
    assert {e["value"] for e in j["edges"]} == set(c.edges["value"])


@pytest.mark.parametrize("kw, says", [
    (dict(method="best"), "unknown circuit method 'best'; valid: threshold, top-n, reachable, influence"),
    (dict(method="top-n", n=0), "-n must be a whole number >= 1, not 0"),
    (dict(method="top-n", n=True), "-n must be a whole number >= 1, not True"),
    (dict(method="top-n", n=2.0), "-n must be a whole number >= 1, not 2.0"),
    (dict(method="threshold", value=-0.5), "--threshold must be a finite number >= 0, not -0.5"),
    (dict(method="threshold", value=float("inf")), "--threshold must be a finite number >= 0"),
    (dict(node_threshold=0.0), "--node-threshold is a cumulative fraction in (0, 1], not 0.0"),
    (dict(node_threshold=1.5), "--node-threshold is a cumulative fraction in (0, 1], not 1.5"),
    (dict(edge_threshold=float("nan")), "--edge-threshold is a cumulative fraction in (0, 1]"),
])
def test_bad_arguments_are_named(stored, kw, says):
    from actwh.errors import ActwhError

    with pytest.raises(ActwhError, match="^" + re.escape(says)):
        find_circuit(Warehouse(stored[0]), 1, 0, **kw)


def test_edge_cases(stored):
    from actwh.errors import ActwhError

    wh = Warehouse(stored[0])
    with pytest.raises(ActwhError, match="^" + re.escape("run 1 has no edges for prompt 4 (populate with --edges)") + "$"):
        find_circuit(wh, 1, 4)
    with pytest.raises(ActwhError, match="prompt=9 is not in run 1"):
        find_circuit(wh, 1, 9)
    with pytest.raises(ActwhError, match="no run 2"):
        find_circuit(wh, 2, 0)
    # thresholds of exactly 1 keep every node with influence and every positive edge
    c = find_circuit(wh, 1, 0, node_threshold=1.0, edge_threshold=1.0)
    assert keys(c) == reference_prune(stored[1][0], 1.0, 1.0)[1]
    assert find_circuit(wh, 1, 0, "threshold", value=0.0).edges.height == len(stored[1][0])
    assert find_circuit(wh, 1, 0, "top-n", n=1).edges.height == 1  # n = 1 is a valid request
    # reachable without a threshold walks every edge: all of them reach the target or not
    everything = find_circuit(wh, 1, 0, "reachable", value=0.0)
    assert keys(find_circuit(wh, 1, 0, "reachable")) == keys(everything)
    assert everything.edges.height > find_circuit(wh, 1, 0, "reachable", value=0.3).edges.height
    # influence_prune's own defaults are the documented 0.8 / 0.98
    from actwh.queries.circuit import influence_prune, load_edges

    assert keys(influence_prune(load_edges(wh, 1, 0))) == reference_prune(stored[1][0], 0.8, 0.98)[1]
