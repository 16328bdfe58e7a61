"""A resume proves it continues the same run: same prompt file, weights and autoencoders, no
new options; a complete run is left as it is. Plus `runs --delete`, validation before any write
for Python callers, and an older warehouse's ENUMs gaining new names on open."""

from __future__ import annotations

import hashlib
import json
import shutil

import duckdb
import pyarrow as pa
import pytest
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

import actwh.runner as runner_mod
from actwh.cli.main import cli
from actwh.errors import ActwhError
from actwh.runner import EdgeOptions, PopulateOptions, populate

from conftest import IOI_ROWS, write_prompts
from test_sae import write_saelens

SCALARS = ("mlp_act_times_grad", "attn_act_times_grad", "sae_act_times_grad")


def digest(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def rows(db, run):
    con = duckdb.connect(str(db), read_only=True)
    try:
        nodes = con.execute("SELECT prompt_id, position, layer, node_type::VARCHAR, node_index, "
                            "scalar::VARCHAR, value FROM node_scalars WHERE run_id = $r ORDER BY ALL",
                            {"r": run}).fetchall()
        prompts = con.execute("SELECT prompt_id, text, metric FROM prompts WHERE run_id = $r ORDER BY 1",
                              {"r": run}).fetchall()
    finally:
        con.close()
    return nodes, prompts


@pytest.fixture
def interrupted(tmp_path, gpt2_dir, monkeypatch):
    """Run 1 stopped after two of its three batches were committed (as a crash would leave it)."""
    model = tmp_path / "model"
    shutil.copytree(gpt2_dir, model)
    sae, _ = write_saelens(tmp_path / "sae", 32, 8, "blocks.0.hook_mlp_out")
    prompts = write_prompts(tmp_path / "p.jsonl")
    db = tmp_path / "wh.duckdb"
    opts = PopulateOptions(prompts=str(prompts), model=str(model), scalars=SCALARS, batch_size=2,
                           saes=((str(sae), None),))
    real, calls = runner_mod.compute_batch, []

    def dies_on_third(*a, **k):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(runner_mod, "compute_batch", dies_on_third)
    with pytest.raises(KeyboardInterrupt):
        populate(db, opts, progress=False, commit_seconds=0)
    monkeypatch.setattr(runner_mod, "compute_batch", real)
    con = duckdb.connect(str(db), read_only=True)
    assert con.execute("SELECT status, (SELECT count(*) FROM prompts) FROM runs").fetchall() == [("running", 4)]
    con.close()
    return tmp_path, db, opts, prompts, model, sae


def resume_cli(db):
    return CliRunner().invoke(cli, ["populate", "--db", str(db), "--resume", "1", "--top", "0"])


def refused(db, fragment):
    before = digest(db)
    r = resume_cli(db)
    lines = r.output.strip().splitlines()
    assert r.exit_code == 1 and len(lines) == 1 and fragment in lines[0], r.output
    assert digest(db) == before


def test_resume_refuses_changed_inputs_then_completes_like_a_fresh_run(interrupted, gpt2_dir):
    tmp, db, opts, prompts, model, sae = interrupted
    # The prompt file edited (a prompt not yet written), then restored.
    text = prompts.read_text()
    prompts.write_text(text.replace("red blue red blue red", "red blue red blue blue"))
    refused(db, f"the prompt file {prompts} changed since it started")
    prompts.write_text(text + json.dumps(IOI_ROWS[0]) + "\n")  # a line added
    refused(db, "the prompt file")
    prompts.write_text(text)
    # The weights changed under the same folder.
    w = load_file(model / "model.safetensors")
    original = {k: v.clone() for k, v in w.items()}
    key = next(k for k in w if k.endswith("ln_f.weight"))
    w[key] = w[key] * 1.01
    save_file(w, model / "model.safetensors", metadata={"format": "pt"})
    refused(db, f"the weights in {model} changed since it started")
    save_file(original, model / "model.safetensors", metadata={"format": "pt"})
    # The autoencoder changed.
    sw = load_file(sae / "sae_weights.safetensors")
    saved = {k: v.clone() for k, v in sw.items()}
    sw["b_enc"] = sw["b_enc"] + 0.5
    save_file(sw, sae / "sae_weights.safetensors")
    refused(db, f"the autoencoder in {sae} changed since it started")
    save_file(saved, sae / "sae_weights.safetensors")
    # Options together with a resume, from Python too.
    with pytest.raises(ActwhError, match="give no other options"):
        populate(db, opts, resume=1)
    # Unchanged inputs: the resume completes, with exactly a fresh run's rows.
    r = resume_cli(db)
    assert r.exit_code == 0 and "run 1: complete, 2 prompts written" in r.output, r.output
    populate(db, opts, progress=False)
    assert rows(db, 1) == rows(db, 2) and len(rows(db, 1)[1]) == 6
    # Resuming a complete run says so and leaves every byte as it was.
    before = digest(db)
    r = resume_cli(db)
    assert r.exit_code == 0 and "run 1 is already complete (6 prompts); nothing to do" in r.output
    assert digest(db) == before


def test_delete_removes_one_run_everywhere(interrupted):
    from actwh.warehouse.schema import EVAL_TABLES, create_missing_tables

    tmp, db, opts, *_ = interrupted
    populate(db, opts, progress=False)
    keep = rows(db, 2)
    # evaluation rows of both runs (as `actwh evaluate` / `circuit --save` leave them)
    con = duckdb.connect(str(db))
    create_missing_tables(con)
    for run in (1, 2):
        con.execute("INSERT INTO evaluations VALUES ($r, $r, now(), '0', '{}')", {"r": run})
        con.execute("INSERT INTO circuit_evals VALUES ($r, $r, 0, 'top-n', 'top-n:5', 5, 4, "
                    "'corrupt', 1.5, 0.5)", {"r": run})
        con.execute("INSERT INTO circuits VALUES ($r, $r, 'top-n', '{}', '[0]', 1, 2, '[]', '[]', "
                    "now())", {"r": run})
    con.close()
    r = CliRunner().invoke(cli, ["runs", "--delete", "1", "--db", str(db)])
    assert r.exit_code == 0 and r.output.startswith("run 1 deleted (4 prompts,"), r.output
    con = duckdb.connect(str(db), read_only=True)
    import actwh.warehouse.store as store

    assert set(store.EVAL_DELETES) == set(EVAL_TABLES)  # every evaluation table is covered
    for table in ("runs", "prompts", "tokens", "node_scalars", "pair_scalars", "edges", "batches",
                  *EVAL_TABLES):
        assert con.execute(f"SELECT count(*) FROM {table} WHERE run_id = 1").fetchone()[0] == 0, table
    for table in ("evaluations", "circuit_evals", "circuits"):
        assert con.execute(f"SELECT count(*) FROM {table} WHERE run_id = 2").fetchone()[0] == 1, table
    assert con.execute("SELECT run_id FROM runs").fetchall() == [(2,)]
    con.close()
    assert rows(db, 2) == keep


def test_delete_is_one_transaction(interrupted, monkeypatch):
    """A failure while deleting (here: the last table) leaves every table as it was."""
    import actwh.warehouse.writer as store

    _, db, *_ = interrupted
    before = rows(db, 1)
    monkeypatch.setattr(store, "RUN_DELETES", {**store.RUN_DELETES,
                                               "x": "DELETE FROM no_such_table WHERE run_id = $run"})
    r = CliRunner().invoke(cli, ["runs", "--delete", "1", "--db", str(db)])
    assert r.exit_code == 1 and r.output.startswith("Error: run 1 was not deleted"), r.output
    assert rows(db, 1) == before


@pytest.mark.parametrize("bad", [dict(batch_size=0), dict(batch_size=-1), dict(batch_size=True),
                                 dict(scalars=()), dict(select="threshold:inf:mlp_act_times_grad"),
                                 dict(edges=EdgeOptions(ig_steps=-3, baseline="corrupt")),
                                 dict(edges=EdgeOptions(), detach_ln=True), dict(dtype="int8"),
                                 dict(device="banana")])
def test_python_callers_get_the_same_validation_before_any_write(tmp_path, gpt2_dir, bad):
    prompts = write_prompts(tmp_path / "p.jsonl")
    opts = PopulateOptions(**{"prompts": str(prompts), "model": str(gpt2_dir), **bad})
    with pytest.raises(ActwhError):
        opts.validate()
    with pytest.raises(ActwhError):
        populate(tmp_path / "wh.duckdb", opts)
    assert not (tmp_path / "wh.duckdb").exists()


def test_options_are_keyword_only(tmp_path):
    with pytest.raises(TypeError):
        PopulateOptions(str(tmp_path / "p.txt"))  # noqa
    with pytest.raises(TypeError):
        EdgeOptions("zero")  # noqa


def test_older_warehouse_gains_new_enum_values_on_open(tmp_path, gpt2_dir):
    """A file made by an actwh without autoencoders (no sae_* scalars or node types) takes a run
    with SAE scalars; its old rows keep their names and values."""
    from actwh.compute.scalars import NODE_TYPES, SCALARS as ALL
    from actwh.warehouse.store import Warehouse, WarehouseWriter

    old_types = tuple(t for t in NODE_TYPES if not t.startswith("sae_"))
    old_scalars = tuple(s for s, v in ALL.items() if not v.sae_level)[::-1]  # another order, too
    db = tmp_path / "old.duckdb"
    w = WarehouseWriter(db, old_types, old_scalars)
    prompts = pa.table({"run_id": pa.array([9, 9], pa.int32()), "prompt_id": pa.array([0, 1], pa.int32()),
                        "text": ["a", "b"], "n_tokens": pa.array([1, 1], pa.int32())})
    nodes = pa.table({"run_id": pa.array([9] * 3, pa.int32()), "prompt_id": pa.array([0, 0, 1], pa.int32()),
                      "position": pa.array([0, 0, 0], pa.int32()), "layer": pa.array([0, 1, 1], pa.int16()),
                      "node_type": ["mlp_neuron", "attn_head", "mlp"],
                      "node_index": pa.array([3, 1, 0], pa.int32()),
                      "scalar": ["mlp_post_act", "attn_act_times_grad", "mlp_layer_direct_effect"],
                      "value": pa.array([0.5, -1.25, 2.0], pa.float32())})
    w.append_batch(9, {"prompts": prompts, "node_scalars": nodes})
    con = duckdb.connect(str(db), read_only=True)
    assert "sae_latent" not in [r[0] for r in con.execute("SELECT unnest(enum_range(NULL::node_type))").fetchall()]
    con.close()
    sae, _ = write_saelens(tmp_path / "sae", 32, 8, "blocks.0.hook_mlp_out")
    p = write_prompts(tmp_path / "p.jsonl")
    run = populate(db, PopulateOptions(prompts=str(p), model=str(gpt2_dir), scalars=SCALARS,
                                       saes=((str(sae), None),)), progress=False).run_id
    with Warehouse(db) as wh:
        old = wh.sql("SELECT prompt_id, layer, node_type::VARCHAR AS t, node_index, scalar::VARCHAR AS s, "
                     "value FROM node_scalars WHERE run_id = 9 ORDER BY ALL").rows()
        new = wh.sql("SELECT DISTINCT node_type::VARCHAR AS t FROM node_scalars WHERE run_id = $r "
                     "AND scalar = 'sae_act_times_grad'", r=run).rows()
        enum = wh.sql("SELECT unnest(enum_range(NULL::scalar))::VARCHAR AS s")["s"].to_list()
    assert old == [(0, 0, "mlp_neuron", 3, "mlp_post_act", 0.5), (0, 1, "attn_head", 1, "attn_act_times_grad", -1.25),
                   (1, 1, "mlp", 0, "mlp_layer_direct_effect", 2.0)]
    assert new == [("sae_latent",)]
    assert enum[:len(old_scalars)] == list(old_scalars) and set(enum) == set(ALL)
