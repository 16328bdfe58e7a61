"""Circuits over datasets: edges averaged over prompts before filtering; stored circuits read
back by id and evaluated on every prompt."""

from __future__ import annotations

from collections import defaultdict

import duckdb
import pytest
from click.testing import CliRunner

from actwh.cli.main import cli
from actwh.evaluate import EvalOptions, evaluate
from actwh.queries.circuits import dataset_circuit, mean_edges, read_circuit, save_circuit
from actwh.warehouse.store import Warehouse

from test_evaluate import ROWS, reference_metric, wh_eval  # noqa: F401  (the fixture)


def brute_mean(db, run, prompts):
    sums = defaultdict(float)
    with duckdb.connect(str(db), read_only=True) as con:
        rows = con.sql("SELECT prompt_id, up_layer, up_type::VARCHAR, up_index, down_layer, "
                       "down_type::VARCHAR, down_index, down_input::VARCHAR, value FROM edges "
                       "WHERE run_id = $r", params={"r": run}).fetchall()
    for p, *key, value in rows:
        if p in prompts:
            if key[4] == "logit":
                key[5] = -1
            sums[tuple(key)] += value
    return {k: v / len(prompts) for k, v in sums.items()}


def test_mean_edges_and_top_n_over_prompts(wh_eval):  # noqa: F811
    db, _ = wh_eval
    wh = Warehouse(db)
    for run, prompts in ((1, [0, 2]), (2, [0, 1, 2, 3])):  # run 2 stores top-k:30 per prompt
        df, ids = mean_edges(wh, run, None if run == 2 else prompts)
        assert ids == prompts
        want = brute_mean(db, run, prompts)
        got = {tuple(r[:3]) + tuple(r[4:7]) + (r[8],): r[9] for r in df.rows()}
        assert got.keys() == want.keys()
        for k in want:
            assert got[k] == pytest.approx(want[k], abs=1e-6)
        if run == 2:  # an edge stored for some prompts only counts 0 for the others
            assert (df["n_prompts"] < 4).any()
        circuit, _ = dataset_circuit(wh, run, prompts if run == 1 else None, "top-n", n=7)
        top = sorted(want.items(), key=lambda kv: -abs(kv[1]))[:7]
        assert {tuple(r) for r in circuit.edges.select(
            "up_layer", "up_type", "up_index", "down_layer", "down_type", "down_index",
            "down_input").rows()} == {k for k, _ in top}


def test_stored_circuit_round_trip_and_evaluation(wh_eval, tmp_path):  # noqa: F811
    import shutil

    db = tmp_path / "wh.duckdb"
    shutil.copy(wh_eval[0], db)
    folder = wh_eval[1]
    wh = Warehouse(db)
    circuit, ids = dataset_circuit(wh, 1, [0, 1, 3], "influence", node_threshold=0.8,
                                   edge_threshold=0.9)
    cid = save_circuit(db, 1, circuit, "influence", {"node_threshold": 0.8, "edge_threshold": 0.9},
                       ids)
    back = read_circuit(Warehouse(db), cid)
    assert back.prompts == [0, 1, 3] and back.method == "influence"
    assert back.edges.height == circuit.edges.height > 0
    # the saved query reads it back by id in SQL: the same edges, values and labels
    from actwh.ontology import node_label
    from actwh.queries.loader import Queries

    sq = Queries()["stored_circuit"](Warehouse(db), circuit=cid)
    key = ("up_layer", "up_type", "up_index", "down_layer", "down_type", "down_index", "down_input")
    want = {r[:7]: r[7] for r in circuit.edges.select(*key, "value").rows()}
    got = {r[:7]: r[7] for r in sq.select(*key, "value").rows()}
    assert got.keys() == want.keys() and all(got[k] == pytest.approx(want[k]) for k in want)
    for r in sq.iter_rows(named=True):
        assert r["up_label"] == node_label(r["up_layer"], r["up_type"], r["up_index"])
        assert r["down_label"] == node_label(r["down_layer"], r["down_type"], r["down_index"])
    assert Queries()["stored_circuit"](Warehouse(db), circuit=cid + 1).height == 0
    # the circuit page draws it by id: every edge, and a clear 404 for an unknown id
    import html
    import re
    import threading
    import urllib.error
    import urllib.request

    from actwh.views.server import make_server, url_of

    srv = make_server(db, port=0)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        page = urllib.request.urlopen(url_of(srv) + f"circuit?run=1&circuit={cid}").read().decode()
        assert f'<span id="n-edges">{circuit.edges.height}</span>' in page
        drawn = html.unescape(page)
        for r in sq.iter_rows(named=True):
            assert r["up_label"] in drawn and r["down_label"] in drawn
        assert re.search(r"prompt 0\b", drawn)  # drawn over its first prompt
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(url_of(srv) + f"circuit?run=1&circuit={cid + 1}")
        assert e.value.code == 404 and f"no circuit {cid + 1}" in e.value.read().decode()
    finally:
        srv.shutdown()
    res = evaluate(db, 1, EvalOptions(baseline="corrupt", prompts=(2, 3)), circuit=back)
    rows = Warehouse(db).sql("SELECT * FROM circuit_evals WHERE eval_id = $e AND selection = $s",
                             e=res.eval_id, s=f"circuit:{cid}")
    assert rows.height == 2 and set(rows["method"]) == {"circuit"}
    kept = back.edges.select("up_layer", "up_type", "up_index", "down_layer", "down_type",
                             "down_index", "down_input", "value").rows()
    for r in rows.iter_rows(named=True):
        ref = reference_metric(folder, ROWS[r["prompt_id"]], kept, corrupt=True)
        assert r["metric"] == pytest.approx(ref, abs=1e-4)


def test_circuit_cli_over_prompts_saves_and_refuses(wh_eval, tmp_path):  # noqa: F811
    import shutil

    db = tmp_path / "wh.duckdb"
    shutil.copy(wh_eval[0], db)
    runner = CliRunner()
    out = runner.invoke(cli, ["circuit", "1", "--prompts", "0,2", "--method", "top-n", "-n", "5",
                              "--save", "--db", str(db)])
    assert out.exit_code == 0, out.output
    assert "circuit 1" in out.output
    assert read_circuit(Warehouse(db), 1).edges.height == 5
    out = runner.invoke(cli, ["evaluate", "1", "--circuit", "1", "--prompts", "1", "--db", str(db)])
    assert out.exit_code == 0, out.output
    for args, message in [(["circuit", "1", "--prompts", "0,9"], "no prompt 9"),
                          (["circuit", "1", "--prompts", "0", "--method", "reachable"], "not 'reachable'"),
                          (["circuit", "1"], "PROMPT or --prompts"),
                          (["evaluate", "1", "--circuit", "5"], "no circuit 5")]:
        out = runner.invoke(cli, [*args, "--db", str(db)])
        assert out.exit_code != 0 and message in out.output, (args, out.output)
