"""The pipelined populate: the next batch computes while the last one is selected, converted and
written on a writer thread. It writes exactly what the sequential populate writes; the two really
overlap; an error on the writer thread surfaces as it did; Ctrl-C leaves whole batches; and a
`kill -9` of a populate process loses no committed batch and leaves no partial one, after which
`--resume` completes the run with exactly a clean run's rows."""

from __future__ import annotations

import math
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import replace

import duckdb
import pytest
from click.testing import CliRunner

import actwh.runner as runner_mod
from actwh.cli.main import cli
from actwh.errors import WarehouseError
from actwh.runner import EdgeOptions, PopulateOptions, populate
from actwh.warehouse.store import WarehouseWriter

from conftest import IOI_ROWS, write_prompts
from test_sae import write_saelens

SCALARS = ("mlp_act_times_grad", "attn_act_times_grad", "attn_pattern", "mlp_post_act",
           "sae_act_times_grad", "sae_latent_act")
TABLES = ("prompts", "tokens", "node_scalars", "pair_scalars", "edges")


def _plain(v):
    return "nan" if isinstance(v, float) and math.isnan(v) else v


def dump(db, run: int) -> dict:
    """Every row a run holds, per table, without run and batch ids, in a fixed order (NaN as a
    string, so that equal rows compare equal); `batches` as the multiset of its counts."""
    con = duckdb.connect(str(db), read_only=True)
    try:
        # t: a table name from the fixed TABLES tuple (identifiers cannot be bound)
        out = {t: [tuple(map(_plain, r)) for r in con.execute(
            f"SELECT * EXCLUDE (run_id) FROM {t} WHERE run_id = $r ORDER BY ALL", {"r": run}).fetchall()]
            for t in TABLES}
        out["batches"] = con.execute("SELECT n_prompts, n_node_rows, n_pair_rows, n_edge_rows FROM "
                                     "batches WHERE run_id = $r ORDER BY ALL", {"r": run}).fetchall()
    finally:
        con.close()
    return out


def whole_batches(db) -> dict:
    """What a crash may leave: the batches rows must add up to the rows, with no duplicate."""
    con = duckdb.connect(str(db), read_only=True)
    try:
        b = con.execute("SELECT count(*), coalesce(sum(n_prompts), 0), coalesce(sum(n_node_rows), 0), "
                        "coalesce(sum(n_pair_rows), 0), coalesce(sum(n_edge_rows), 0) FROM batches").fetchone()
        # t: one of the four table names listed below (identifiers cannot be bound)
        have = tuple(con.execute(f"SELECT count(*) FROM {t}").fetchone()[0]
                     for t in ("prompts", "node_scalars", "pair_scalars", "edges"))
        distinct = con.execute("SELECT count(DISTINCT (run_id, prompt_id)) FROM prompts").fetchone()[0]
        dup_nodes = con.execute("SELECT count(*) FROM (SELECT run_id, prompt_id, position, layer, "
                                "node_type, node_index, scalar FROM node_scalars GROUP BY ALL "
                                "HAVING count(*) > 1)").fetchone()[0]
        status = con.execute("SELECT status FROM runs").fetchall()
    finally:
        con.close()
    assert b[1:] == have, f"partial batch: batches say {b[1:]}, tables hold {have}"
    assert distinct == have[0] and dup_nodes == 0, "duplicate rows"
    return {"batches": b[0], "prompts": have[0], "status": status}


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, gpt2_dir):
    """Mixed prompt lengths, an SAE spliced, component and node-level edges with the corrupt
    baseline: every kind of row a batch carries."""
    tmp = tmp_path_factory.mktemp("pipeline")
    sae, _ = write_saelens(tmp / "sae", 32, 16, "blocks.0.hook_mlp_out")
    corrupt_rows = [r for r in IOI_ROWS if "corrupt" in r]
    prompts = write_prompts(tmp / "p.jsonl", rows=corrupt_rows + [
        {**corrupt_rows[0], "text": corrupt_rows[0]["text"] + " and", "corrupt": corrupt_rows[0]["corrupt"] + " and"},
        {**corrupt_rows[1], "text": "then " + corrupt_rows[1]["text"], "corrupt": "then " + corrupt_rows[1]["corrupt"]}],
        repeat=2)
    opts = PopulateOptions(prompts=str(prompts), model=str(gpt2_dir), scalars=SCALARS, batch_size=3,
                           select="top-k:7:mlp_act_times_grad", saes=((str(sae), None),),
                           edges=EdgeOptions(baseline="corrupt", select="top-k:9", into=2))
    return tmp, opts


@pytest.mark.parametrize("edges", [True, False])
def test_pipelined_writes_exactly_what_the_sequential_populate_writes(inputs, edges):
    """With component edges only the write overlaps the next compute (their memory plan counts
    one batch on the device); without, selection and conversion do too."""
    tmp, opts = inputs
    if not edges:
        opts = replace(opts, edges=None, scalars=(*SCALARS, "mlp_attribution"), baseline="mean")
    seq = populate(tmp / f"seq{edges}.duckdb", opts, progress=False, pipelined=False, commit_seconds=0)
    pip = populate(tmp / f"pip{edges}.duckdb", opts, progress=False, commit_seconds=0)
    a, b = dump(tmp / f"seq{edges}.duckdb", seq.run_id), dump(tmp / f"pip{edges}.duckdb", pip.run_id)
    assert len(a["prompts"]) == 8 and len(a["batches"]) == 3
    assert all(a[t] for t in TABLES if edges or t != "edges"), {t: len(a[t]) for t in TABLES}
    assert a == b
    assert (pip.status, pip.rows, pip.completeness) == (seq.status, seq.rows, seq.completeness)
    assert pip.rows["node_scalars"] == len(a["node_scalars"])
    assert not [t for t in threading.enumerate() if t.name == "actwh-writer"]


def test_the_next_batch_computes_while_the_last_is_written(tmp_path, gpt2_dir, monkeypatch):
    """The writer thread's write of batch 1 is held until batch 2's compute has begun: a
    pipelined run completes; the sequential one cannot (its compute waits for the write)."""
    prompts = write_prompts(tmp_path / "p.jsonl")
    opts = PopulateOptions(prompts=str(prompts), model=str(gpt2_dir), batch_size=2,
                           scalars=("mlp_act_times_grad",))
    real_compute, real_queue = runner_mod.compute_batch, WarehouseWriter.queue_batch
    computing, seen, wait_s = threading.Event(), [], [20.0]

    def compute(*a, **k):
        if len(seen) == 1:  # batch 1 is handed over and not written yet
            computing.set()
        seen.append(1)
        return real_compute(*a, **k)

    def queue_batch(self, run_id, tables):
        if not computing.wait(timeout=wait_s[0]):
            raise WarehouseError("batch 2 did not start computing while batch 1 was written")
        return real_queue(self, run_id, tables)

    monkeypatch.setattr(runner_mod, "compute_batch", compute)
    monkeypatch.setattr(WarehouseWriter, "queue_batch", queue_batch)
    result = populate(tmp_path / "a.duckdb", opts, progress=False)
    assert result.status == "complete" and len(seen) == 3
    seen.clear()
    computing.clear()
    wait_s[0] = 1.0
    with pytest.raises(WarehouseError, match="did not start computing"):
        populate(tmp_path / "b.duckdb", opts, progress=False, pipelined=False)


def test_a_writer_thread_error_surfaces_as_before(tmp_path, gpt2_dir, monkeypatch):
    """The second commit fails on the writer thread: populate raises that error (the CLI prints
    its one line), the first batch stays whole, nothing partial is left, and a resume completes."""
    prompts = write_prompts(tmp_path / "p.jsonl")
    db = tmp_path / "wh.duckdb"
    real, calls = WarehouseWriter._commit, []

    def commit(self, con, group):
        calls.append(1)
        if len(calls) == 2:
            raise WarehouseError("batch 2 of run 1 was not written: disk full (planted)")
        return real(self, con, group)

    monkeypatch.setattr(WarehouseWriter, "_commit", commit)
    r = CliRunner().invoke(cli, ["populate", str(prompts), "--db", str(db), "--model", str(gpt2_dir),
                                 "--batch-size", "2", "--commit-seconds", "0", "--top", "0"])
    assert r.exit_code == 1, r.output
    assert r.output.strip().splitlines() == ["Error: batch 2 of run 1 was not written: disk full "
                                             "(planted)"]
    assert whole_batches(db) == {"batches": 1, "prompts": 2, "status": [("running",)]}
    assert not [t for t in threading.enumerate() if t.name == "actwh-writer"]
    monkeypatch.setattr(WarehouseWriter, "_commit", real)
    r = CliRunner().invoke(cli, ["populate", "--db", str(db), "--resume", "1", "--top", "0"])
    assert r.exit_code == 0 and "run 1: complete, 4 prompts written" in r.output, r.output


def test_ctrl_c_writes_what_was_computed_and_stops_the_thread(tmp_path, gpt2_dir, monkeypatch):
    """Ctrl-C while batch 3 computes: batches 1 and 2 (computed before it) are written whole,
    the writer thread is gone, and the CLI says `interrupted` with status 130."""
    prompts = write_prompts(tmp_path / "p.jsonl")
    db = tmp_path / "wh.duckdb"
    real, calls = runner_mod.compute_batch, []

    def compute(*a, **k):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(runner_mod, "compute_batch", compute)
    r = CliRunner().invoke(cli, ["populate", str(prompts), "--db", str(db), "--model", str(gpt2_dir),
                                 "--batch-size", "2", "--commit-seconds", "0", "--top", "0"])
    assert r.exit_code == 130 and r.output.strip().splitlines() == ["Error: interrupted"], r.output
    assert whole_batches(db) == {"batches": 2, "prompts": 4, "status": [("running",)]}
    assert not [t for t in threading.enumerate() if t.name == "actwh-writer"]


def _committed(db) -> int:
    try:
        con = duckdb.connect(str(db), read_only=True)
    except duckdb.Error:  # the writer holds it, or it is not made yet
        return 0
    try:
        return con.execute("SELECT count(*) FROM batches").fetchone()[0]
    except duckdb.Error:
        return 0
    finally:
        con.close()


def test_kill_9_mid_run_loses_no_committed_batch_then_resume_equals_a_clean_run(inputs, gpt2_dir):
    tmp, opts = inputs
    prompts = write_prompts(tmp / "kill.jsonl", repeat=4)  # 24 prompts, one per batch
    db = tmp / "killed.duckdb"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "actwh.cli", "populate", str(prompts), "--db", str(db),
                             "--model", str(gpt2_dir), "--batch-size", "1", "--commit-seconds", "0",
                             "--top", "0", "--scalars", ",".join(SCALARS[:4]), "--edges"],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 240
    while _committed(db) < 3 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, proc.stderr.read().decode()
    left = whole_batches(db)
    assert left["status"] == [("running",)] and 3 <= left["prompts"] < 24, left
    assert left["batches"] == left["prompts"]  # one prompt per batch, each whole
    r = CliRunner().invoke(cli, ["populate", "--db", str(db), "--resume", "1", "--top", "0"])
    assert r.exit_code == 0 and f"run 1: complete, {24 - left['prompts']} prompts written" in r.output, r.output
    clean = populate(tmp / "clean.duckdb", PopulateOptions(
        prompts=str(prompts), model=str(gpt2_dir), batch_size=1, scalars=SCALARS[:4],
        edges=EdgeOptions()), progress=False, pipelined=False)
    assert dump(db, 1) == dump(tmp / "clean.duckdb", clean.run_id)
    assert whole_batches(db)["status"] == [("complete",)]
