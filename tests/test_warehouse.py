"""Warehouse writes: exact round trips, atomic batches, Arrow-only inserts, plain-DuckDB readability."""

from __future__ import annotations

import subprocess
import sys

import duckdb
import numpy as np
import pyarrow as pa
import pytest
import torch

from actwh.compute.loading import load_model
from actwh.compute.prompts import read_prompts
from actwh.compute.scalars import NODE_TYPES, SCALARS, compute_scalars
from actwh.compute.selection import Selection
from actwh.compute.targets import Batch, get_target
from actwh.errors import WarehouseError
from actwh.runner import PopulateOptions, encode_all, populate
from actwh.warehouse.store import Warehouse, WarehouseWriter

from conftest import write_prompts

SCALAR_SET = ("mlp_post_act", "mlp_act_times_grad", "attn_act_times_grad", "attn_pattern",
              "attn_direct_effect", "token_attribution", "mlp_layer_direct_effect")


@pytest.fixture(scope="module")
def populated(tmp_path_factory, gpt2_dir):
    tmp = tmp_path_factory.mktemp("pop")
    prompts = write_prompts(tmp / "p.jsonl")
    db = tmp / "wh.duckdb"
    opts = PopulateOptions(prompts=str(prompts), model=str(gpt2_dir), scalars=SCALAR_SET,
                           target="logit_diff", select="top-k:7:mlp_act_times_grad", batch_size=4)
    result = populate(db, opts, progress=False)
    return db, opts, result


def test_round_trip_equals_compute_values_and_selection_size(populated):
    db, opts, result = populated
    assert result.status == "complete"
    loaded = load_model(opts.model, device="cpu")
    target = get_target("logit_diff")
    encoded = encode_all(loaded, read_prompts(opts.prompts), target, False)
    wh = Warehouse(db)
    # The same batches the runner made: sorted by length, right-padded, batch_size prompts each.
    pending = sorted(encoded, key=lambda e: len(e.ids))
    dense = {}
    for i in range(0, len(pending), opts.batch_size):
        chunk = pending[i:i + opts.batch_size]
        n = max(len(e.ids) for e in chunk)
        ids = torch.tensor([e.ids + [2] * (n - len(e.ids)) for e in chunk])
        mask = torch.tensor([[1] * len(e.ids) + [0] * (n - len(e.ids)) for e in chunk])
        batch = Batch(ids, mask, torch.tensor([e.target for e in chunk]),
                      torch.tensor([e.distractor for e in chunk]))
        res = compute_scalars(loaded.model, batch, target, SCALAR_SET)
        for j, e in enumerate(chunk):
            dense[e.prompt_id] = ({k: v[j:j + 1] for k, v in res.token.items()},
                                  {k: v[j:j + 1] for k, v in res.pair.items()})
    for e in encoded:
        token, pair = dense[e.prompt_id]
        rows = wh.sql("SELECT position, layer, node_type::VARCHAR AS node_type, node_index, "
                      "scalar::VARCHAR AS scalar, value FROM node_scalars WHERE run_id = $run "
                      "AND prompt_id = $p", run=result.run_id, p=e.prompt_id)
        for r in rows.iter_rows(named=True):
            s = SCALARS[r["scalar"]]
            li = 0 if s.embed_level else r["layer"]
            want = token[r["scalar"]][0, r["position"], li, r["node_index"]]
            assert np.float32(r["value"]) == np.float32(want.item()), r  # exact in float32
        # Selection size: 7 per node type, for each stored scalar of that type.
        counts = dict(rows.group_by("scalar").len().iter_rows())
        n_tokens = len(e.ids)
        for name in SCALAR_SET:
            if name in token:
                n_nodes = n_tokens * token[name].shape[2] * token[name].shape[3]
                assert counts[name] == min(7, n_nodes), name
        pairs = wh.sql("SELECT layer, head, query_pos, key_pos, value FROM pair_scalars WHERE "
                       "run_id = $run AND prompt_id = $p AND scalar = 'attn_pattern'",
                       run=result.run_id, p=e.prompt_id)
        for r in pairs.iter_rows(named=True):
            want = pair["attn_pattern"][0, r["layer"], r["head"], r["query_pos"], r["key_pos"]]
            assert np.float32(r["value"]) == np.float32(want.item())
        kept_heads = wh.sql("SELECT count(*) AS n FROM node_scalars WHERE run_id = $run AND "
                            "prompt_id = $p AND scalar = 'attn_act_times_grad'",
                            run=result.run_id, p=e.prompt_id)["n"][0]
        rows_per_head = wh.sql("SELECT count(*) AS n FROM (SELECT DISTINCT layer, head, query_pos "
                               "FROM pair_scalars WHERE run_id = $run AND prompt_id = $p)",
                               run=result.run_id, p=e.prompt_id)["n"][0]
        assert rows_per_head == kept_heads


def test_rows_are_sorted_by_prompt_and_batches_add_up(populated):
    db, _, result = populated
    con = duckdb.connect(str(db), read_only=True)
    ids = [r[0] for r in con.execute("SELECT prompt_id FROM node_scalars ORDER BY rowid").fetchall()]
    batches = con.execute("SELECT sum(n_prompts), sum(n_node_rows), sum(n_pair_rows) FROM batches "
                          "WHERE run_id = $r", {"r": result.run_id}).fetchone()
    n_nodes = con.execute("SELECT count(*) FROM node_scalars").fetchone()[0]
    n_pairs = con.execute("SELECT count(*) FROM pair_scalars").fetchone()[0]
    con.close()
    # Sorted within each batch (batches follow prompt length, so across batches ids may restart).
    breaks = sum(1 for a, b in zip(ids, ids[1:]) if b < a)
    assert breaks < 2  # 6 prompts in 2 batches: at most one restart between them
    assert batches == (6, n_nodes, n_pairs)


def test_each_table_is_one_arrow_insert_per_batch(tmp_path, gpt2_dir, monkeypatch):
    statements = []

    class Spy:
        def __init__(self, con):
            self.con = con

        def execute(self, sql, *args):
            statements.append(sql)
            return self.con.execute(sql, *args)

        def __getattr__(self, name):
            return getattr(self.con, name)

    import actwh.warehouse.writer as store

    real_connect = store.connect
    monkeypatch.setattr(store, "connect", lambda *a, **k: Spy(real_connect(*a, **k)))
    prompts = write_prompts(tmp_path / "p.jsonl")
    populate(tmp_path / "w.duckdb", PopulateOptions(prompts=str(prompts), model=str(gpt2_dir),
                                                    scalars=SCALAR_SET, batch_size=3), progress=False)
    inserts = [s for s in statements if s.startswith("INSERT INTO") and "batch_rows" in s]
    assert len(inserts) == 2 * 4  # 2 batches x (prompts, tokens, node_scalars, pair_scalars)
    assert all("SELECT * FROM batch_rows" in s for s in inserts)


def test_error_inside_transaction_fails_loudly_and_writes_nothing(tmp_path):
    writer = WarehouseWriter(tmp_path / "w.duckdb", NODE_TYPES, tuple(SCALARS))
    prompts = pa.table({"run_id": pa.array([1], pa.int32()), "prompt_id": pa.array([0], pa.int32()),
                        "text": ["x"], "n_tokens": pa.array([1], pa.int32())})
    bad = pa.table({"run_id": [1], "prompt_id": [0], "no_such_column": [1.0]})
    with pytest.raises(WarehouseError, match="was not written"):
        writer.append_batch(1, {"prompts": prompts, "node_scalars": bad})
    with Warehouse(tmp_path / "w.duckdb") as wh:
        assert wh.sql("SELECT count(*) AS n FROM prompts")["n"][0] == 0
        assert wh.sql("SELECT count(*) AS n FROM batches")["n"][0] == 0


def test_silently_rolled_back_commit_is_detected(tmp_path, monkeypatch):
    import actwh.warehouse.writer as store

    writer = WarehouseWriter(tmp_path / "w.duckdb", NODE_TYPES, tuple(SCALARS))

    class RollsBack:  # what DuckDB does to a COMMIT after an error inside the transaction
        def __init__(self, con):
            self.con = con

        def execute(self, sql, *args):
            return self.con.execute("ROLLBACK" if sql == "COMMIT" else sql, *args)

        def __getattr__(self, name):
            return getattr(self.con, name)

    real_connect = store.connect
    monkeypatch.setattr(store, "connect", lambda *a, **k: RollsBack(real_connect(*a, **k)))
    prompts = pa.table({"run_id": pa.array([1], pa.int32()), "prompt_id": pa.array([0], pa.int32()),
                        "text": ["x"], "n_tokens": pa.array([1], pa.int32())})
    with pytest.raises(WarehouseError, match="did not land"):
        writer.append_batch(1, {"prompts": prompts})


def test_file_is_readable_by_plain_duckdb_and_sqlalchemy(populated):
    db, _, result = populated
    code = f"""
import sys, duckdb, sqlalchemy as sa
con = duckdb.connect({str(db)!r}, read_only=True)
n = con.execute("SELECT count(*) FROM nodes WHERE node_label LIKE 'L%'").fetchone()[0]
con.close()
engine = sa.create_engine("duckdb:///{db}", connect_args={{"read_only": True}})
insp = sa.inspect(engine)
tables = set(insp.get_table_names())
cols = [c["name"] for c in insp.get_columns("node_scalars")]
assert not any(m == "actwh" or m.startswith("actwh.") for m in sys.modules), "actwh was imported"
print(n, sorted(tables), cols)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    n, tables, cols = out.stdout.split(" ", 1)[0], out.stdout, out.stdout
    assert int(n) > 0
    for t in ("models", "saes", "runs", "prompts", "tokens", "node_scalars", "pair_scalars", "edges"):
        assert f"'{t}'" in tables
    assert "['run_id', 'prompt_id', 'position', 'layer', 'node_type', 'node_index', 'scalar', 'value']" in cols


def test_schema_version_mismatch_is_a_clear_error(populated, tmp_path):
    import shutil

    copy = tmp_path / "old.duckdb"
    shutil.copy(populated[0], copy)
    con = duckdb.connect(str(copy))
    con.execute("UPDATE actwh_meta SET value = '0' WHERE key = 'schema_version'")
    con.close()
    with pytest.raises(WarehouseError, match="schema version 0"):
        Warehouse(copy)


def test_export_writes_one_parquet_per_table(populated, tmp_path):
    import polars as pl

    db, _, result = populated
    files = Warehouse(db).export_run(result.run_id, tmp_path / "out")
    names = {f.stem for f in files}
    assert {"runs", "prompts", "tokens", "node_scalars", "pair_scalars", "edges"} <= names
    assert not list((tmp_path / "out").glob(".*tmp"))
    with Warehouse(db) as wh:
        n = wh.sql("SELECT count(*) AS n FROM node_scalars WHERE run_id = $r", r=result.run_id)["n"][0]
    assert pl.read_parquet(tmp_path / "out" / "node_scalars.parquet").height == n


def test_writer_transaction_rolls_back_on_any_error(tmp_path):
    """A Python error inside `transaction()` (not only a DuckDB one) leaves nothing behind."""
    writer = WarehouseWriter(tmp_path / "w.duckdb", NODE_TYPES, tuple(SCALARS))
    with pytest.raises(RuntimeError, match="boom"):
        with writer.transaction() as con:
            con.execute("INSERT INTO actwh_meta VALUES ('half', 'written')")
            raise RuntimeError("boom")
    with writer.transaction() as con:  # and the writer still works afterwards
        con.execute("INSERT INTO actwh_meta VALUES ('whole', 'written')")
    with Warehouse(tmp_path / "w.duckdb") as wh:
        keys = set(wh.sql("SELECT key FROM actwh_meta")["key"])
    assert "half" not in keys and "whole" in keys
