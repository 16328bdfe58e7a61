"""`actwh verify`: each measured effect equals a hand-written ablation or patch."""

from __future__ import annotations

import pytest
import torch
from click.testing import CliRunner

from actwh.cli.main import cli
from actwh.compute.loading import load_model
from actwh.queries.loader import Queries
from actwh.runner import EdgeOptions, PopulateOptions, populate
from actwh.verify import verify
from actwh.warehouse.store import Warehouse

from conftest import write_prompts
from test_evaluate import ROWS, reference_metric


@pytest.fixture(scope="module")
def wh_verify(tmp_path_factory, gpt2_dir):
    folder = tmp_path_factory.mktemp("verify")
    prompts = write_prompts(folder / "p.jsonl", ROWS)
    db = folder / "wh.duckdb"
    populate(db, PopulateOptions(prompts=str(prompts), model=str(gpt2_dir), batch_size=3, select="dense",
                                 scalars=("attn_act_times_grad", "mlp_act_times_grad",
                                          "token_attribution"),
                                 edges=EdgeOptions(baseline="corrupt", select="dense")), progress=False)
    return db, gpt2_dir


def metric(logits, tok, row):
    t, d = (tok(row[k], add_special_tokens=False).input_ids[0] for k in ("target", "distractor"))
    return float(logits[0, -1, t] - logits[0, -1, d])


def test_node_effects_equal_hand_written_ablations(wh_verify):
    db, folder = wh_verify
    eval_id = verify(db, 1, "nodes", 3, prompts=(0, 2), batch_size=2)
    wh = Warehouse(db)
    rows = wh.sql("SELECT * FROM node_effects WHERE eval_id = $e", e=eval_id)
    assert sorted(rows["scalar"].unique().to_list()) == ["attn_act_times_grad",
                                                         "mlp_act_times_grad", "token_attribution"]
    assert rows.height == 2 * 3 * 3
    loaded = load_model(folder, device="cpu")
    model, tok = loaded.model, loaded.tokenizer
    for r in rows.iter_rows(named=True):
        row = ROWS[r["prompt_id"]]
        ids = torch.tensor([tok(row["text"]).input_ids])
        L, i, p = r["layer"], r["node_index"], r["position"]

        def zero(t, name):
            t = t.clone()
            if r["node_type"] == "embed":
                t[0, p] = 0
            else:
                t[0, p, i] = 0
            return t
        site = {"attn_head": [f"blocks.{L}.attn.hook_z"], "mlp_neuron": [f"blocks.{L}.mlp.hook_post"],
                "embed": ["hook_embed", "hook_pos_embed"]}[r["node_type"]]
        with torch.no_grad():
            clean = metric(model(ids), tok, row)
            with model.hooks([(s, zero) for s in site]):
                ablated = metric(model(ids), tok, row)
        assert r["measured"] == pytest.approx(clean - ablated, abs=1e-4)
        with Warehouse(db).connection() as con:
            stored = con.execute("SELECT value FROM node_scalars WHERE run_id = 1 AND prompt_id = $p "
                                 "AND scalar = $s AND layer = $l AND node_index = $i AND "
                                 "position = $pos", {"p": r["prompt_id"], "s": r["scalar"], "l": L,
                                                     "i": i, "pos": p}).fetchone()[0]
        assert r["predicted"] == pytest.approx(stored)
    agree = Queries()["verify_agreement"](wh, eval=eval_id)
    assert agree.height == 3 and agree["n"].to_list() == [6, 6, 6]


def test_edge_effects_equal_transformers_reference(wh_verify):
    db, folder = wh_verify
    eval_id = verify(db, 1, "edges", 2, prompts=(1, 3))
    wh = Warehouse(db)
    rows = wh.sql("SELECT * FROM edge_effects WHERE eval_id = $e", e=eval_id)
    assert rows.height == 4 and set(rows["baseline"]) == {"corrupt"}
    assert set(rows["method"]) == {"EAP"}
    for r in rows.iter_rows(named=True):
        edges = wh.sql("SELECT up_layer, up_type::VARCHAR, up_index, down_layer, "
                       "down_type::VARCHAR, down_index, down_input::VARCHAR, value FROM edges "
                       "WHERE run_id = 1 AND prompt_id = $p", p=r["prompt_id"]).rows()
        key = (r["up_layer"], r["up_type"], r["up_index"], r["down_layer"], r["down_type"],
               r["down_index"], r["down_input"])
        others = [e for e in edges if tuple(e[:7]) != key]
        assert len(others) == len(edges) - 1
        row = ROWS[r["prompt_id"]]
        clean = reference_metric(folder, row, edges, corrupt=True)
        assert r["measured"] == pytest.approx(clean - reference_metric(folder, row, others, True),
                                              abs=1e-4)
        top = sorted(edges, key=lambda e: -abs(e[-1]))[:2]
        assert key in [tuple(e[:7]) for e in top]


def test_verify_refuses_bad_input(wh_verify):
    db, _ = wh_verify
    runner = CliRunner()
    for args, message in [(["verify", "1"], "one of --nodes"),
                          (["verify", "1", "--nodes", "top:0"], "top:N"),
                          (["verify", "1", "--nodes", "3"], "top:N"),
                          (["verify", "1", "--nodes", "top:2", "--scalars", "attn_pattern"],
                           "did not store"),
                          (["verify", "7", "--edges", "top:2"], "no run 7")]:
        out = runner.invoke(cli, [*args, "--db", str(db)])
        assert out.exit_code != 0 and message in out.output, (args, out.output)


@pytest.mark.parametrize("family_dir", ["mixtral"], indirect=True)
def test_verify_refuses_scalars_it_cannot_patch(tmp_path, family_dir):
    """A stored scalar verify cannot measure (attention pairs; experts, which are not patched
    alone) is refused in one line, not silently skipped; nothing is written."""
    _, folder = family_dir
    db = tmp_path / "wh.duckdb"
    populate(db, PopulateOptions(prompts=str(write_prompts(tmp_path / "p.jsonl", ROWS)),
                                 model=str(folder), scalars=("attn_pattern", "expert_act_times_grad")),
             progress=False)
    before = db.stat().st_mtime_ns, db.stat().st_size
    for scalar, message in (("attn_pattern", "no per-node values"),
                            ("expert_act_times_grad", "mlp_expert nodes cannot be patched")):
        out = CliRunner().invoke(cli, ["verify", "1", "--nodes", "top:2", "--scalars", scalar,
                                       "--db", str(db)])
        assert out.exit_code != 0 and message in out.output, out.output
        assert len(out.output.strip().splitlines()) == 1
    assert (db.stat().st_mtime_ns, db.stat().st_size) == before


def test_node_circuits_equal_hand_written_ablation(wh_verify):
    """evaluate --nodes: keep each prompt's top-n heads and neurons by |Σ_pos act × grad|, zero
    every other head's z and neuron everywhere: the same metric as hooks written here."""
    import duckdb

    db, folder = wh_verify
    out = CliRunner().invoke(cli, ["evaluate", "1", "--nodes", "--baseline", "zero", "--sizes",
                                   "2,7", "--prompts", "0,3", "--db", str(db)])
    assert out.exit_code == 0, out.output
    wh = Warehouse(db)
    rows = wh.sql("SELECT * FROM circuit_evals WHERE method = 'nodes' ORDER BY prompt_id")
    assert rows.height == 2 * 4
    loaded = load_model(folder, device="cpu")
    model, tok = loaded.model, loaded.tokenizer
    cfg = model.cfg
    with duckdb.connect(str(db), read_only=True) as con:
        scores = con.sql("SELECT prompt_id, layer, node_type::VARCHAR, node_index, sum(value) "
                         "FROM node_scalars WHERE run_id = 1 AND scalar::VARCHAR IN "
                         "('attn_act_times_grad', 'mlp_act_times_grad') GROUP BY ALL").fetchall()
    for r in rows.iter_rows(named=True):
        row = ROWS[r["prompt_id"]]
        ids = torch.tensor([tok(row["text"]).input_ids])
        mine = sorted((s for s in scores if s[0] == r["prompt_id"]), key=lambda s: -abs(s[4]))
        n = {"none": 0, "all": None}.get(r["selection"])
        if n is None and r["selection"] != "all":
            n = int(r["selection"].rsplit(":", 1)[1])
        kept = {(s[1], s[2], s[3]) for s in mine[:n]} if n is not None else None

        def zero(t, name):
            L = int(name.split(".")[1])
            kind = "attn_head" if name.endswith("hook_z") else "mlp_neuron"
            t = t.clone()
            for i in range(t.shape[2]):
                if (L, kind, i) not in kept:
                    t[:, :, i] = 0
            return t
        hooks = [] if kept is None else [(f"blocks.{L}.{s}", zero) for L in range(cfg.n_layers)
                                         for s in ("attn.hook_z", "mlp.hook_post")]
        with torch.no_grad(), model.hooks(hooks):
            ref = metric(model(ids), tok, row)
        assert r["metric"] == pytest.approx(ref, abs=1e-4), r["selection"]
        if n:
            assert r["n_nodes"] == n
    ranked = Queries()["method_auc"](wh)
    assert "nodes" not in ranked["scoring"].to_list()


def test_node_circuits_with_latents_under_the_corrupt_baseline(tmp_path, gpt2_dir):
    """evaluate --nodes on a run with an autoencoder: heads, neurons and latents ranked together;
    every node outside each prompt's top n takes its activation on the corrupted prompt. The
    metric equals a patch written here from the corrupted run's own cache; latents get kept."""
    import duckdb

    from actwh.compute.sae import load_sae, splice
    from actwh.evaluate import EvalOptions, evaluate_nodes
    from test_sae import write_saelens

    loaded = load_model(gpt2_dir, device="cpu")
    sae_dir, _ = write_saelens(tmp_path / "sae", loaded.model.cfg.d_model, 16,
                               "blocks.1.hook_resid_pre")
    prompts = write_prompts(tmp_path / "p.jsonl", ROWS)
    db = tmp_path / "wh.duckdb"
    populate(db, PopulateOptions(prompts=str(prompts), model=str(gpt2_dir), batch_size=3,
                                 select="dense", saes=((str(sae_dir), None),),
                                 scalars=("attn_act_times_grad", "mlp_act_times_grad",
                                          "sae_act_times_grad")), progress=False)
    res = evaluate_nodes(db, 1, EvalOptions("top-n", (4, 12), "corrupt", (0, 1, 3), batch_size=2))
    model, tok = loaded.model, loaded.tokenizer
    splice(model, load_sae(str(sae_dir)))
    latents = "blocks.1.hook_resid_pre.sae.hook_latents"
    sites = {**{(L, "attn_head"): f"blocks.{L}.attn.hook_z" for L in range(model.cfg.n_layers)},
             **{(L, "mlp_neuron"): f"blocks.{L}.mlp.hook_post" for L in range(model.cfg.n_layers)},
             (1, "sae_latent"): latents}
    with duckdb.connect(str(db), read_only=True) as con:
        scores = con.sql("SELECT prompt_id, layer, node_type::VARCHAR, node_index, sum(value) "
                         "FROM node_scalars WHERE run_id = 1 GROUP BY ALL").fetchall()
    kept_latents = 0
    rows = Warehouse(db).sql("SELECT * FROM circuit_evals WHERE eval_id = $e", e=res.eval_id)
    assert rows.height == 3 * 4
    for r in rows.iter_rows(named=True):
        row = ROWS[r["prompt_id"]]
        ids = torch.tensor([tok(row["text"]).input_ids])
        bad = torch.tensor([tok(row["corrupt"]).input_ids])
        assert bad.shape == ids.shape
        with torch.no_grad():
            corrupt = model.run_with_cache(bad, list(sites.values())).acts
        mine = sorted((s for s in scores if s[0] == r["prompt_id"]), key=lambda s: -abs(s[4]))
        n = {"none": 0, "all": None}.get(r["selection"], None)
        if r["selection"].startswith("nodes:"):
            n = int(r["selection"].rsplit(":", 1)[1])
        kept = None if n is None else {(s[1], s[2], s[3]) for s in mine[:n]}
        if kept:
            kept_latents += sum(k[1] == "sae_latent" for k in kept)

        def patch(t, name):
            (L, kind), = [k for k, v in sites.items() if v == name]
            t = t.clone()
            for i in range(t.shape[2]):
                if (L, kind, i) not in kept:
                    t[:, :, i] = corrupt[name][:, :, i]
            return t
        hooks = [] if kept is None else [(s, patch) for s in sites.values()]
        with torch.no_grad(), model.hooks(hooks):
            ref = metric(model(ids), tok, row)
        assert r["metric"] == pytest.approx(ref, abs=1e-4), r["selection"]
    assert kept_latents > 0
