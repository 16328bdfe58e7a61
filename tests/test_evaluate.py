"""`actwh evaluate`: rows against a reference written with plain hooks on the transformers model,
the saved queries against brute force, bad input refused before anything is written."""

from __future__ import annotations

import json

import duckdb
import numpy as np
import polars as pl
import pytest
import torch
from click.testing import CliRunner

from actwh.cli.main import cli
from actwh.compute.edges import downstream_nodes, upstream_nodes
from actwh.compute.loading import load_model
from actwh.compute.targets import Batch
from actwh.evaluate import EvalOptions, evaluate
from actwh.queries.circuit import influence_prune
from actwh.queries.loader import Queries
from actwh.runner import EdgeOptions, PopulateOptions, populate
from actwh.warehouse.store import Warehouse

from conftest import IOI_ROWS, write_prompts
from test_patching import hf_name, hf_patched

ROWS = [
    {"text": "when Mary and John went to the store , John gave a drink to", "target": "Mary",
     "distractor": "John", "corrupt": "when Mary and she went to the store , John gave a drink to"},
    {"text": "the cat and the dog went to the store", "target": "cat", "distractor": "dog",
     "corrupt": "the dog and the cat went to the store"},
    {"text": "red blue red blue red", "target": "blue", "distractor": "red",
     "corrupt": "one two one two one"},
    {"text": "Mary gave the apple to John , then John gave the apple to", "target": "Mary",
     "distractor": "John", "corrupt": "she gave the apple to John , then John gave the apple to"},
]


@pytest.fixture(scope="module")
def wh_eval(tmp_path_factory, gpt2_dir):
    """Run 1: EAP edges with the corrupt baseline, dense; run 2: act × grad edges, top-k:30."""
    folder = tmp_path_factory.mktemp("eval")
    prompts = write_prompts(folder / "p.jsonl", ROWS)
    db = folder / "wh.duckdb"
    populate(db, PopulateOptions(prompts=str(prompts), model=str(gpt2_dir), batch_size=3,
                                 edges=EdgeOptions(baseline="corrupt", select="dense")), progress=False)
    populate(db, PopulateOptions(prompts=str(prompts), model=str(gpt2_dir), batch_size=2,
                                 edges=EdgeOptions(baseline="zero", select="top-k:30")), progress=False)
    return db, gpt2_dir


def stored_edges(db, run, prompt):
    with duckdb.connect(str(db), read_only=True) as con:
        return con.sql("SELECT up_layer, up_type::VARCHAR, up_index, down_layer, "
                       "down_type::VARCHAR, down_index, down_input::VARCHAR, value FROM edges "
                       "WHERE run_id = $r AND prompt_id = $p", params={"r": run, "p": prompt}).fetchall()


def name_of(layer, kind, index, down_input=None, down=False):
    if kind == "embed":
        return "emb"
    if kind == "logit":
        return "out"
    if kind == "mlp":
        return ("mlp", layer)
    return (down_input, layer, index) if down else ("head", layer, index)


def reference_metric(folder, row, kept_rows, corrupt: bool):
    """Logit difference of transformers' GPT-2 with only `kept_rows` edges unpatched."""
    import transformers as T

    hf = T.AutoModelForCausalLM.from_pretrained(folder, attn_implementation="eager").eval()
    tok = load_model(folder, device="cpu").tokenizer
    ids = torch.tensor([tok(row["text"]).input_ids])
    mask = torch.ones_like(ids)
    kept = {(name_of(*r[:3]), name_of(r[3], r[4], r[5], r[6], down=True)) for r in kept_rows}
    if corrupt:
        _, base = hf_patched(hf, torch.tensor([tok(row["corrupt"]).input_ids]), mask, set(), None)
    else:
        _, clean = hf_patched(hf, ids, mask, set(), None)
        base = {k: torch.zeros_like(v) for k, v in clean.items()}
    logits, _ = hf_patched(hf, ids, mask, kept, base)
    t, d = (tok(row[k], add_special_tokens=False).input_ids[0] for k in ("target", "distractor"))
    return float(logits[0, -1, t] - logits[0, -1, d])


def test_top_n_rows_equal_transformers_reference(wh_eval):
    db, folder = wh_eval
    res = evaluate(db, 1, EvalOptions("top-n", (3, 12, 10_000), "corrupt", (0, 2, 3), batch_size=2))
    wh = Warehouse(db)
    rows = wh.sql("SELECT * FROM circuit_evals WHERE eval_id = $e ORDER BY prompt_id, n_edges",
                  e=res.eval_id)
    prompts = {r["prompt_id"]: r for r in wh.sql("SELECT * FROM prompts WHERE run_id = 1")
               .iter_rows(named=True)}
    assert sorted(rows["prompt_id"].unique().to_list()) == [0, 2, 3]
    assert rows.height == 3 * 5  # none, three sizes, all
    for r in rows.iter_rows(named=True):
        p = prompts[r["prompt_id"]]
        clean, bad = p["metric"], p["corrupt_metric"]
        edges = sorted(stored_edges(db, 1, r["prompt_id"]), key=lambda e: -abs(e[-1]))
        if r["selection"] == "none":
            assert r["metric"] == pytest.approx(bad, abs=1e-4) and r["n_edges"] == 0
        elif r["selection"] == "all":
            assert r["metric"] == pytest.approx(clean, abs=1e-4)
            assert r["n_edges"] == len(edges)  # dense: every edge of the graph is stored
        else:
            n = int(r["selection"].split(":")[1])
            kept = edges[:n]
            assert r["n_edges"] == len(kept)
            nodes = {(e[0], e[1], e[2]) for e in kept} | {
                (e[3], e[4], e[5] if e[4] != "logit" else 0) for e in kept}
            assert r["n_nodes"] == len(nodes)
            ref = reference_metric(folder, ROWS[r["prompt_id"]], kept, corrupt=True)
            assert r["metric"] == pytest.approx(ref, abs=1e-4)
        assert r["faithfulness"] == pytest.approx((r["metric"] - bad) / (clean - bad), abs=1e-4)
    # the curve moves: some circuit is neither empty nor full in effect
    mids = rows.filter(~pl.col("selection").is_in(["none", "all"]))["faithfulness"]
    assert ((mids - 1).abs() > 1e-3).any() and (mids.abs() > 1e-3).any()
    opts = json.loads(wh.sql("SELECT options FROM evaluations WHERE eval_id = $e",
                             e=res.eval_id)["options"][0])
    assert opts["method"] == "top-n" and opts["edges"]["baseline"] == "corrupt"
    assert opts["prompts"] == [0, 2, 3]


def test_influence_and_zero_baseline_rows_equal_reference(wh_eval):
    db, folder = wh_eval
    res = evaluate(db, 2, EvalOptions("influence", (0.9,), "zero", (1, 3)))
    wh = Warehouse(db)
    rows = wh.sql("SELECT * FROM circuit_evals WHERE eval_id = $e AND selection LIKE 'influence%'",
                  e=res.eval_id)
    assert rows["selection"].to_list() == ["influence:0.8/0.9"] * 2
    for r in rows.iter_rows(named=True):
        df = wh.sql("SELECT up_layer, up_type::VARCHAR AS up_type, up_index, up_pos, down_layer, "
                    "down_type::VARCHAR AS down_type, down_index, down_pos, "
                    "down_input::VARCHAR AS down_input, value FROM edges WHERE run_id = 2 AND "
                    "prompt_id = $p", p=r["prompt_id"])
        kept = influence_prune(df, 0.8, 0.9).edges
        assert 0 < kept.height < df.height == 30  # top-k:30 stored; pruning drops some
        assert r["n_edges"] == kept.height
        kept_rows = kept.select("up_layer", "up_type", "up_index", "down_layer", "down_type",
                                "down_index", "down_input", "value").rows()
        ref = reference_metric(folder, ROWS[r["prompt_id"]], kept_rows, corrupt=False)
        assert r["metric"] == pytest.approx(ref, abs=1e-4)
        low = wh.sql("SELECT metric FROM circuit_evals WHERE eval_id = $e AND prompt_id = $p AND "
                     "selection = 'none'", e=res.eval_id, p=r["prompt_id"])["metric"][0]
        assert low == pytest.approx(reference_metric(folder, ROWS[r["prompt_id"]], [], False),
                                    abs=1e-4)


def trapezoid_auc(points):
    points = sorted(points)
    return sum((x1 - x0) * (y0 + y1) / 2 for (x0, y0), (x1, y1) in zip(points, points[1:]))


def test_saved_queries_against_brute_force(wh_eval):
    db, _ = wh_eval
    a = evaluate(db, 1, EvalOptions("top-n", (2, 5, 20, 60), "corrupt", (0, 1, 3))).eval_id
    b = evaluate(db, 1, EvalOptions("threshold", (0.5, 0.05), "corrupt", (0, 1, 3))).eval_id
    c = evaluate(db, 2, EvalOptions("top-n", (5, 20), "corrupt", (0, 1, 3))).eval_id
    wh = Warehouse(db)
    q = Queries()
    rows = wh.sql("SELECT * FROM circuit_evals WHERE eval_id IN ($a, $b, $c)", a=a, b=b, c=c)

    curve = q["faithfulness_curve"](wh, run=1, method="top-n")  # the latest: a
    assert curve["eval_id"].unique().to_list() == [a]
    mine = rows.filter(pl.col("eval_id") == a).group_by("selection").agg(
        pl.col("faithfulness").mean(), pl.col("n_edges").mean())
    assert curve.height == mine.height == 6
    for r in curve.iter_rows(named=True):
        m = mine.filter(pl.col("selection") == r["selection"]).row(0, named=True)
        assert r["faithfulness"] == pytest.approx(m["faithfulness"])
    assert curve["mean_edges"].to_list() == sorted(curve["mean_edges"].to_list())
    assert q["faithfulness_curve"](wh, eval=b)["method"].unique().to_list() == ["threshold"]

    small = q["smallest_circuit"](wh, eval=a, level=0.5)
    for pid in (0, 1, 3):
        mine = rows.filter((pl.col("eval_id") == a) & (pl.col("prompt_id") == pid)
                           & (pl.col("faithfulness") >= 0.5)).sort("n_edges")
        got = small.filter(pl.col("prompt_id") == pid)
        assert got["n_edges"][0] == mine["n_edges"][0]

    ranked = q["method_auc"](wh)
    expected = {}
    for e in (a, b, c):
        sub = rows.filter(pl.col("eval_id") == e)
        aucs = []
        for pid in (0, 1, 3):
            p = sub.filter(pl.col("prompt_id") == pid)
            total = p["n_edges"].max()
            aucs.append(trapezoid_auc(list(zip((p["n_edges"] / total).to_list(),
                                               p["faithfulness"].to_list()))))
        expected[e] = float(np.mean(aucs))
    assert set(ranked["eval_id"].to_list()) == {a, b, c}
    for r in ranked.iter_rows(named=True):
        assert r["auc"] == pytest.approx(expected[r["eval_id"]], abs=1e-9)
        assert r["n_prompts"] == 3
    assert ranked["eval_id"].to_list() == sorted(expected, key=lambda e: -expected[e])
    assert ranked.filter(pl.col("eval_id") == c)["scoring"][0] == "EAP top-n"


def count_rows(db):
    with duckdb.connect(str(db), read_only=True) as con:
        have = {r[0] for r in con.sql("SELECT table_name FROM information_schema.tables").fetchall()}
        return con.sql("SELECT count(*) FROM circuit_evals").fetchone()[0] \
            if "circuit_evals" in have else 0


def test_bad_input_is_refused_before_anything_is_written(tmp_path, gpt2_dir):
    db = tmp_path / "wh.duckdb"
    plain = write_prompts(tmp_path / "plain.jsonl", IOI_ROWS)  # most rows lack a corrupt text
    populate(db, PopulateOptions(prompts=str(plain), model=str(gpt2_dir),
                                 edges=EdgeOptions(baseline="zero", select="dense")),
             progress=False)
    populate(db, PopulateOptions(prompts=str(plain), model=str(gpt2_dir)), progress=False)  # run 2: no edges
    runner = CliRunner()
    cases = [
        (["evaluate", "9"], "no run 9"),
        (["evaluate", "1", "--prompts", "0,77"], "no prompt 77"),
        (["evaluate", "1", "--prompts", "0,x"], "bad --prompts"),
        (["evaluate", "1", "--method", "top-n", "--sizes", "5,x"], "bad --sizes"),
        (["evaluate", "1", "--method", "top-n", "--sizes", "0"], "edge counts"),
        (["evaluate", "1", "--sizes", "1.5"], "cumulative fractions"),
        (["evaluate", "1", "--method", "threshold", "--sizes", "-1"], "thresholds"),
        (["evaluate", "1"], "corrupt"),  # the default baseline needs corrupt texts
        (["evaluate", "2", "--baseline", "zero"], "no component edges"),
    ]
    for args, message in cases:
        out = runner.invoke(cli, [*args, "--db", str(db)])
        assert out.exit_code != 0, args
        assert message in out.output, (args, out.output)
        assert len(out.output.strip().splitlines()) == 1, out.output
        assert count_rows(db) == 0
    out = runner.invoke(cli, ["evaluate", "1", "--baseline", "zero", "--method", "top-n",
                              "--sizes", "4", "--prompts", "2,5", "--db", str(db)])
    assert out.exit_code == 0, out.output
    assert count_rows(db) == 2 * 3
    assert "tokens/s" not in out.output  # progress stays quiet when stderr is not a terminal


def test_evaluate_and_verify_show_progress_on_a_terminal(wh_eval, capsys):
    from actwh.verify import verify

    db, _ = wh_eval
    evaluate(db, 1, EvalOptions("top-n", (3,), "zero", (0, 1, 2), batch_size=2, progress=True))
    err = capsys.readouterr().err
    assert "\r2/3 prompts  " in err and "\r3/3 prompts  " in err and "tokens/s" in err and "ETA" in err
    verify(db, 1, "edges", 1, prompts=(0, 1), batch_size=1, progress=True)
    err = capsys.readouterr().err
    assert "\r1/2 prompts  " in err and "\r2/2 prompts  " in err
    evaluate(db, 1, EvalOptions("top-n", (3,), "zero", (0, 1, 2), batch_size=2, progress=False))
    assert capsys.readouterr().err == ""


def test_an_older_file_gets_the_evaluation_tables(wh_eval, tmp_path):
    import shutil

    db = tmp_path / "old.duckdb"
    shutil.copy(wh_eval[0], db)
    with duckdb.connect(str(db)) as con:
        con.execute("DROP TABLE IF EXISTS circuit_evals")
        con.execute("DROP TABLE IF EXISTS evaluations")
    evaluate(db, 1, EvalOptions("top-n", (3,), "mean", (2,)))
    evaluate(db, 1, EvalOptions("top-n", (3,), "mean", (2,)))
    assert count_rows(db) == 2 * 3


def test_mean_baseline_averages_over_all_the_runs_prompts(wh_eval):
    """With every edge patched to the mean, the 'none' metric is the metric of a model whose
    writes are the per-position mean over all the run's prompts (not just those evaluated)."""
    from actwh.compute.patching import mean_writes, run_patched

    db, folder = wh_eval
    res = evaluate(db, 1, EvalOptions("top-n", (3,), "mean", (2,)))
    low = Warehouse(db).sql("SELECT metric FROM circuit_evals WHERE eval_id = $e AND "
                            "selection = 'none'", e=res.eval_id)["metric"][0]
    loaded = load_model(folder, device="cpu")
    tok = loaded.tokenizer
    singles = [Batch(torch.tensor([tok(r["text"]).input_ids]),
                     torch.ones(1, len(tok(r["text"]).input_ids), dtype=torch.long)) for r in ROWS]
    means = mean_writes(loaded.model, singles)
    b = singles[2]
    t, d = (tok(ROWS[2][k], add_special_tokens=False).input_ids[0] for k in ("target", "distractor"))
    model = loaded.model
    none = torch.zeros(len(upstream_nodes(model)), len(downstream_nodes(model)), dtype=torch.bool)
    logits = run_patched(model, b, none, means)
    assert low == pytest.approx(float(logits[0, -1, t] - logits[0, -1, d]), abs=1e-4)


def test_default_model_influence_circuit_faithfulness(tmp_path):
    """Acceptance: the influence circuit at its default thresholds on the default model's IOI
    prompts, evaluated against the corrupted prompts; the rows equal the transformers reference
    (the figure itself is the model's, reported in the README, not asserted)."""
    from actwh.compute.default_model import WEIGHTS, default_prompts

    db = tmp_path / "wh.duckdb"
    populate(db, PopulateOptions(prompts=str(default_prompts("ioi")),
                                 edges=EdgeOptions(baseline="corrupt", select="dense")), progress=False)
    res = evaluate(db, 1, EvalOptions("influence", (0.98,), "corrupt"))
    wh = Warehouse(db)
    rows = wh.sql("SELECT * FROM circuit_evals WHERE eval_id = $e AND selection = "
                  "'influence:0.8/0.98' ORDER BY prompt_id", e=res.eval_id)
    assert rows.height == 24
    prompts = [json.loads(line) for line in default_prompts("ioi").read_text().splitlines()]
    for r in rows.head(3).iter_rows(named=True):
        df = wh.sql("SELECT up_layer, up_type::VARCHAR AS up_type, up_index, up_pos, down_layer, "
                    "down_type::VARCHAR AS down_type, down_index, down_pos, "
                    "down_input::VARCHAR AS down_input, value FROM edges WHERE run_id = 1 AND "
                    "prompt_id = $p", p=r["prompt_id"])
        kept = influence_prune(df, 0.8, 0.98).edges.select(
            "up_layer", "up_type", "up_index", "down_layer", "down_type", "down_index",
            "down_input", "value").rows()
        row = dict(prompts[r["prompt_id"]])
        row["target"], row["distractor"] = " " + row["target"], " " + row["distractor"]
        assert r["n_edges"] == len(kept)
        assert r["metric"] == pytest.approx(reference_metric(WEIGHTS, row, kept, True), abs=1e-3)
    curve = Queries()["faithfulness_curve"](wh, eval=res.eval_id)
    print("default model, influence circuit (0.8/0.98), corrupt baseline:",
          curve.select("selection", "mean_edges", "faithfulness").rows())
    # the model card reports this evaluation's figures: the share of the mean logit difference
    # the circuits recover and the mean faithfulness, computed here from the rows
    card = json.loads((WEIGHTS / "card.json").read_text())["methods"]["influence_default"]
    every = wh.sql("SELECT selection, avg(metric) AS m, avg(faithfulness) AS f FROM circuit_evals "
                   "WHERE eval_id = $e GROUP BY selection", e=res.eval_id)
    m = dict(zip(every["selection"].to_list(), every["m"].to_list()))
    recovered = (m["influence:0.8/0.98"] - m["none"]) / (m["all"] - m["none"])
    assert card["recovered"] == pytest.approx(recovered, abs=1e-4)
    assert card["faithfulness"] == pytest.approx(rows["faithfulness"].mean(), abs=1e-4)
    # Acceptance: EAP, EAP-IG (5 steps) and influence pruning in one warehouse, ranked by AUC
    populate(db, PopulateOptions(prompts=str(default_prompts("ioi")),
                                 edges=EdgeOptions(baseline="corrupt", ig_steps=5, select="dense")), progress=False)
    evaluate(db, 1, EvalOptions("top-n", (10, 50), "corrupt"))
    evaluate(db, 2, EvalOptions("top-n", (10, 50), "corrupt"))
    ranked = Queries()["method_auc"](Warehouse(db))
    assert sorted(ranked["scoring"].to_list()) == ["EAP influence", "EAP top-n", "EAP-IG top-n"]
    assert ranked["rank"].to_list() == [1, 2, 3]
    assert ranked["auc"].to_list() == sorted(ranked["auc"].to_list(), reverse=True)
    assert ranked["n_prompts"].to_list() == [24] * 3


@pytest.mark.parametrize("baseline", ["corrupt", "zero"])
def test_k_sizes_cost_at_most_k_forward_passes(wh_eval, monkeypatch, baseline):
    """#20 acc. 6, counted in node evaluations (a head's attention, an MLP): per batch the baseline
    run (the corrupted prompts: every node once; zero: none) and one pass per size that runs
    only the nodes its circuits read, so k sizes cost the top-n circuits' own nodes plus one
    full pass, at most k full passes here; no clean pass (populate stored the clean metric).
    The faithfulness end points still come out 0 and 1."""
    from actwh.compute import patching
    from actwh.compute.model import MLP, Attention, HookedTransformer

    db, gpt2_dir = wh_eval
    full, sparse, work = [], [], []
    forward, run_sparse = HookedTransformer.forward, patching._run_sparse
    attend, mlp_forward = Attention.attend, MLP.forward
    monkeypatch.setattr(HookedTransformer, "forward",
                        lambda self, *a, **k: full.append(1) or forward(self, *a, **k))
    monkeypatch.setattr(patching, "_run_sparse",
                        lambda *a, **k: sparse.append(1) or run_sparse(*a, **k))
    monkeypatch.setattr(Attention, "attend",
                        lambda self, q, *a, **k: work.append(q.shape[2]) or attend(self, q, *a, **k))
    monkeypatch.setattr(MLP, "forward", lambda self, x: work.append(1) or mlp_forward(self, x))
    sizes = (2, 5, 9, 10_000)
    prompts = (0, 1, 2, 3)
    res = evaluate(db, 1, EvalOptions("top-n", sizes, baseline, prompts, batch_size=1))
    cfg = load_model(gpt2_dir, device="cpu").model.cfg
    per_pass = cfg.n_layers * (cfg.n_heads + 1)  # nodes a bare forward pass runs
    expected = 0
    for p in prompts:  # a batch per prompt: its baseline run, then each size's circuit's nodes
        expected += per_pass if baseline == "corrupt" else 0
        edges = sorted(stored_edges(db, 1, p), key=lambda e: -abs(e[-1]))
        for n in sizes:
            expected += len({(e[0], e[1], e[2]) for e in edges[:n] if e[1] != "embed"})
    assert sum(work) == expected
    assert sum(work) <= len(sizes) * per_pass * len(prompts)
    assert len(full) == (len(prompts) if baseline == "corrupt" else 0)
    assert len(sparse) == len(prompts) * (len(sizes) + (baseline != "corrupt"))  # + all patched
    rows = Warehouse(db).sql("SELECT selection, faithfulness FROM circuit_evals WHERE eval_id = $e",
                             e=res.eval_id)
    ends = dict(rows.filter(pl.col("selection").is_in(["none", "all"])).group_by("selection")
                .agg(pl.col("faithfulness").min().alias("lo"), pl.col("faithfulness").max()
                     .alias("hi")).select("selection", pl.concat_list("lo", "hi")).iter_rows())
    assert ends == {"none": [0.0, 0.0], "all": [1.0, 1.0]}


@pytest.mark.parametrize("family_dir", ["gemma2", "mixtral", "llama"], indirect=True)
def test_whole_graph_circuit_is_the_clean_run_on_other_families(family_dir, tmp_path):
    """Post-norm (hooked patching), experts (hooked; experts are nodes) and grouped-query
    attention (sparse), prompts of mixed lengths: a top-n size past the graph's edge count keeps
    every stored edge, so its metric is the clean metric populate stored from a plain forward;
    the empty circuit's is the corrupted prompt's, measured here with a plain forward too."""
    family, folder = family_dir
    prompts = write_prompts(tmp_path / "p.jsonl", ROWS)
    db = tmp_path / "wh.duckdb"
    populate(db, PopulateOptions(prompts=str(prompts), model=str(folder), batch_size=2,
                                 edges=EdgeOptions(baseline="corrupt", select="dense")), progress=False)
    res = evaluate(db, 1, EvalOptions("top-n", (3, 10_000), "corrupt", batch_size=3))
    wh = Warehouse(db)
    got = wh.sql("SELECT prompt_id, selection, metric FROM circuit_evals WHERE eval_id = $e",
                 e=res.eval_id)
    clean = dict(wh.sql("SELECT prompt_id, metric FROM prompts WHERE run_id = 1").iter_rows())
    loaded = load_model(folder, device="cpu")
    tok = loaded.tokenizer
    for (pid, sel, metric) in got.iter_rows():
        row = ROWS[pid]
        if sel == "top-n:10000":
            assert metric == pytest.approx(clean[pid], abs=1e-4)
        if sel == "none":
            ids = torch.tensor([tok(row["corrupt"]).input_ids])
            one = lambda w: tok(w, add_special_tokens=False).input_ids[-1]  # noqa: E731
            with torch.no_grad():
                logits = loaded.model(ids)[0, -1]
            assert metric == pytest.approx(float(logits[one(row["target"])] - logits[one(row["distractor"])]),
                                           abs=1e-4)
    assert got.filter(pl.col("selection") == "top-n:3").height == len(ROWS)
    # circuits over prompts average every stored edge, the experts' too
    from actwh.queries.circuits import mean_edges

    mean, _ = mean_edges(wh, 1, None)
    per_prompt = wh.sql("SELECT count(*) AS n FROM edges WHERE run_id = 1 AND prompt_id = 0")["n"][0]
    assert mean.height == per_prompt
