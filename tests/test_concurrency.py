"""Creating and opening a warehouse under contention: simultaneous starts, a full disk, a corrupted
file, a reader that holds the file while a populate runs, and small batches grouped per commit."""

from __future__ import annotations

import hashlib
import multiprocessing
import os
import resource
import signal
import subprocess
import sys
import time

import duckdb
import pytest
from click.testing import CliRunner

from actwh.cli.main import cli
from actwh.runner import PopulateOptions, populate

from conftest import IOI_ROWS, write_prompts
from test_cli_populate import invariants

ACTWH = [sys.executable, "-m", "actwh.cli"]
ENV = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
# The reader's hold in the long case: the 90 s; ACTWH_TEST_HOLD_S shortens it locally.
LONG_HOLD_S = float(os.environ.get("ACTWH_TEST_HOLD_S", "90"))


def _start(args, err_path):
    """A forked `actwh populate` (imports shared with the parent, so 20 start in seconds)."""
    fd = os.open(err_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    os.dup2(fd, 2)
    os.dup2(fd, 1)
    try:
        cli.main(args, prog_name="actwh", standalone_mode=True)
    except SystemExit as e:
        os._exit(e.code if isinstance(e.code, int) else 1)
    except BaseException:
        import traceback

        traceback.print_exc()
        os._exit(99)
    os._exit(0)


def test_twenty_simultaneous_starts_make_twenty_runs(tmp_path, gpt2_dir):
    prompts = write_prompts(tmp_path / "p.jsonl", IOI_ROWS[:2])
    db = tmp_path / "wh.duckdb"
    # Warm this process (first-use costs of tokenizer and kernels), so 20 forks start alike.
    populate(tmp_path / "warm.duckdb", PopulateOptions(prompts=str(prompts), model=str(gpt2_dir),
                                                       scalars=("mlp_act_times_grad",)), progress=False)
    (tmp_path / "warm.duckdb").unlink()
    ctx = multiprocessing.get_context("fork")
    procs = []
    for i in range(20):
        args = ["populate", str(prompts), "--model", str(gpt2_dir), "--db", str(db), "--top", "0",
                "--name", f"start{i}", "--scalars", "mlp_act_times_grad"]
        p = ctx.Process(target=_start, args=(args, str(tmp_path / f"err{i}")))
        procs.append(p)
    for p in procs:
        p.start()
    for p in procs:
        p.join(300)
    errs = [(tmp_path / f"err{i}").read_text() for i in range(20)]
    assert [p.exitcode for p in procs] == [0] * 20, errs
    assert not any("Traceback" in e for e in errs), errs
    con = duckdb.connect(str(db), read_only=True)
    runs = con.execute("SELECT run_id, name, status FROM runs ORDER BY run_id").fetchall()
    per_run = con.execute("SELECT run_id, count(*) FROM prompts GROUP BY 1 ORDER BY 1").fetchall()
    con.close()
    assert [r[0] for r in runs] == list(range(1, 21))
    assert sorted(r[1] for r in runs) == sorted(f"start{i}" for i in range(20))  # one run each
    assert {r[2] for r in runs} == {"complete"} and per_run == [(i, 2) for i in range(1, 21)]
    invariants(db)
    # no half-made file or staging folder left: only the warehouse and its runs' lock file
    # (runlock.py: empty, kept, its locks gone with their processes)
    assert sorted(p.name for p in tmp_path.iterdir() if "wh.duckdb" in p.name) == [".wh.duckdb.runs.lock",
                                                                                  "wh.duckdb"]


def _full_disk():
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG
    resource.setrlimit(resource.RLIMIT_FSIZE, (48 * 1024, 48 * 1024))


def test_creation_on_a_full_disk_leaves_no_file_then_works(tmp_path, gpt2_dir):
    prompts = write_prompts(tmp_path / "p.jsonl", IOI_ROWS[:2])
    db = tmp_path / "wh.duckdb"
    args = [*ACTWH, "populate", str(prompts), "--model", str(gpt2_dir), "--db", str(db), "--top", "0"]
    r = subprocess.run(args, capture_output=True, text=True, env=ENV, preexec_fn=_full_disk, timeout=300)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 1 and len(lines) == 1, r.stderr
    assert lines[0].startswith(f"Error: cannot create {db}:"), lines
    assert list(tmp_path.glob("*wh.duckdb*")) == []  # neither the real name nor a leftover
    r = subprocess.run(args, capture_output=True, text=True, env=ENV, timeout=300)
    assert r.returncode == 0, r.stderr
    assert invariants(db)[:2] == (1, 2)


@pytest.mark.parametrize("damage", ["truncated", "zeroed_block", "garbage"])
def test_a_corrupted_file_is_reported_as_corrupted_at_once(tmp_path, gpt2_dir, damage):
    prompts = write_prompts(tmp_path / "p.jsonl", IOI_ROWS[:2])
    db = tmp_path / "wh.duckdb"
    r = CliRunner().invoke(cli, ["populate", str(prompts), "--model", str(gpt2_dir), "--db", str(db),
                                 "--top", "0"])
    assert r.exit_code == 0, r.output
    data = db.read_bytes()
    if damage == "truncated":  # the header and a little more, as an interrupted copy leaves it
        db.write_bytes(data[:20000])
    elif damage == "zeroed_block":  # DuckDB's message then says "block", which is not a lock
        db.write_bytes(data[:4096] + b"\0" * (len(data) - 4096))
    else:
        db.write_bytes(os.urandom(len(data)))
    before = hashlib.sha256(db.read_bytes()).hexdigest()
    for argv in (["sql", "SELECT count(*) AS n FROM node_scalars", "--db", str(db)],
                 ["populate", str(prompts), "--model", str(gpt2_dir), "--db", str(db), "--top", "0"]):
        t0 = time.monotonic()
        r = CliRunner().invoke(cli, argv)
        lines = r.output.strip().splitlines()
        assert r.exit_code == 1 and len(lines) == 1, r.output
        assert f"{db} is corrupted or not a DuckDB file" in lines[0] and "locked" not in lines[0]
        assert "waiting" not in r.output and time.monotonic() - t0 < 8  # no lock-retry loop
    assert hashlib.sha256(db.read_bytes()).hexdigest() == before


def _hold(db, seconds, ready):
    """Hold a read-only connection to db (as a notebook would) for `seconds`."""
    code = f"""
import duckdb, time, pathlib
while True:  # the writer may hold the file at this moment: take it as soon as it lets go
    try:
        c = duckdb.connect({str(db)!r}, read_only=True)
        break
    except duckdb.IOException:
        time.sleep(0.01)
pathlib.Path({str(ready)!r}).touch()
time.sleep({seconds})
c.close()
"""
    return subprocess.Popen([sys.executable, "-c", code], env=ENV)


def _wait_for(path, proc, timeout=120):
    t0 = time.monotonic()
    while not path.exists():
        assert proc.poll() is None and time.monotonic() - t0 < timeout, "the reader never got the file"
        time.sleep(0.02)


def _hold_once_written(db, proc, after_run=0, timeout=120):
    """A read-only connection to db, taken by the very connection that first sees a prompt of a
    run after `after_run` written (no gap in which the populate could finish), and how many
    such prompts it saw."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout and proc.poll() is None:
        try:
            con = duckdb.connect(str(db), read_only=True)
        except duckdb.Error:
            time.sleep(0.01)
            continue
        try:
            n = con.execute("SELECT count(*) FROM prompts WHERE run_id > $r", {"r": after_run}).fetchone()[0]
        except duckdb.Error:  # the file exists, its tables not yet
            n = 0
        if n:
            return con, n
        con.close()
        time.sleep(0.01)
    raise AssertionError("populate wrote nothing")


@pytest.mark.parametrize("hold_s", [4.0, LONG_HOLD_S], ids=["short", "long"])
def test_a_reader_holding_the_file_never_fails_a_populate(tmp_path, gpt2_dir, hold_s):
    prompts = write_prompts(tmp_path / "p.jsonl", repeat=4)  # 24 prompts, 24 batches
    db = tmp_path / "wh.duckdb"
    pop = subprocess.Popen([*ACTWH, "populate", str(prompts), "--model", str(gpt2_dir), "--db", str(db),
                            "--top", "0", "--batch-size", "1", "--commit-seconds", "0"],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)
    held, seen = _hold_once_written(db, pop)  # this process now holds the file, as a notebook would
    t_held = time.monotonic()
    assert seen < 24, "the populate finished before the file was held: nothing was tested"
    time.sleep(hold_s)
    held.close()
    out, err = pop.communicate(timeout=300)
    assert pop.returncode == 0, err
    assert time.monotonic() - t_held >= hold_s - 1  # it waited the hold out, never gave up
    assert f"process {os.getpid()}" in err and "holding finished batches" in err, err
    assert "Traceback" not in err
    runs, n, status = invariants(db)
    assert (runs, n, status) == (1, 24, [("complete",)])
    assert_in_order(db, 24)


def assert_in_order(db, n):
    """Batches landed in the order they were computed: shortest prompts first (ties by id), one
    batches row each, in that order, its id the batch's (here: its one prompt's) id."""
    con = duckdb.connect(str(db), read_only=True)
    written = con.execute("SELECT prompt_id, n_tokens FROM prompts ORDER BY rowid").fetchall()
    batch_ids = [r[0] for r in con.execute("SELECT batch_id FROM batches ORDER BY rowid").fetchall()]
    con.close()
    assert [p for p, _ in written] == [p for p, _ in sorted(written, key=lambda r: (r[1], r[0]))]
    assert batch_ids == [p for p, _ in written] and len(batch_ids) == n


def test_held_batches_spill_beside_the_file_and_commit_in_order(tmp_path, gpt2_dir, monkeypatch):
    """In-process populate with no memory for held batches: every batch held while another
    process has the file goes to the staging folder, and all land, in order, once it is free."""
    import actwh.runner as runner_mod

    prompts = write_prompts(tmp_path / "p.jsonl", repeat=2)  # 12 prompts
    db = tmp_path / "wh.duckdb"
    real, calls, state = runner_mod.compute_batch, [], {}
    ready = tmp_path / "held"

    def compute(*a, **k):
        calls.append(1)
        if len(calls) == 3:  # two batches are in; now a reader takes the file for 3 s
            state["holder"] = _hold(db, 3.0, ready)
            _wait_for(ready, state["holder"])
        return real(*a, **k)

    monkeypatch.setattr(runner_mod, "compute_batch", compute)
    messages = []
    opts = PopulateOptions(prompts=str(prompts), model=str(gpt2_dir), batch_size=1)
    result = populate(db, opts, progress=False, on_wait=messages.append, commit_seconds=0,
                      hold_bytes=0)
    state["holder"].wait()
    assert result.status == "complete" and result.n_written == 12
    assert any(f"process {state['holder'].pid}" in m and "spilling to" in m for m in messages), messages
    assert not list(tmp_path.glob(".wh.duckdb.staging-*"))  # removed once written
    runs, n, status = invariants(db)
    assert (runs, n, status) == (1, 12, [("complete",)])
    assert_in_order(db, 12)


def test_small_batches_share_a_commit(tmp_path, gpt2_dir):
    prompts = write_prompts(tmp_path / "p.jsonl", repeat=2)  # 12 prompts
    opts = PopulateOptions(prompts=str(prompts), model=str(gpt2_dir), batch_size=1)
    grouped = populate(tmp_path / "a.duckdb", opts, progress=False, commit_seconds=3600)
    single = populate(tmp_path / "b.duckdb", opts, progress=False, commit_seconds=0)
    by_rows = populate(tmp_path / "c.duckdb", opts, progress=False, commit_seconds=3600, commit_rows=1)
    assert (grouped.commits, single.commits, by_rows.commits) == (1, 12, 12)
    tables = []
    for name in ("a", "b"):
        con = duckdb.connect(str(tmp_path / f"{name}.duckdb"), read_only=True)
        tables.append((con.execute("SELECT batch_id, n_prompts, n_node_rows, n_pair_rows FROM batches "
                                   "ORDER BY 1").fetchall(),
                       con.execute("SELECT prompt_id, position, layer, node_type::VARCHAR, node_index, "
                                   "scalar::VARCHAR, value FROM node_scalars ORDER BY ALL").fetchall()))
        con.close()
    assert tables[0] == tables[1] and len(tables[0][0]) == 12  # one batches row per batch either way


def test_leftovers_of_killed_writers_are_removed(tmp_path):
    """A writer SIGKILLed while creating or spilling leaves a half-made file or a staging folder
    under a hidden name; the next writer removes those whose process is gone, and only those."""
    from actwh.compute.scalars import NODE_TYPES, SCALARS
    from actwh.warehouse.store import WarehouseWriter

    gone = subprocess.Popen(["true"])
    gone.wait()
    alive = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        dead_files = [f".wh.duckdb.creating-{gone.pid}-0a1b2c3d", f".wh.duckdb.creating-{gone.pid}-0a1b2c3d.wal"]
        live_file = f".wh.duckdb.creating-{alive.pid}-0a1b2c3d"
        for name in [*dead_files, live_file]:
            (tmp_path / name).write_bytes(b"half")
        (tmp_path / f".wh.duckdb.staging-{gone.pid}").mkdir()
        (tmp_path / f".wh.duckdb.staging-{gone.pid}" / "x.arrows").write_bytes(b"x")
        (tmp_path / f".wh.duckdb.staging-{alive.pid}").mkdir()
        WarehouseWriter(tmp_path / "wh.duckdb", NODE_TYPES, tuple(SCALARS))
        assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
            [live_file, f".wh.duckdb.staging-{alive.pid}", "wh.duckdb"])
    finally:
        alive.kill()
        alive.wait()


def test_a_run_being_written_is_neither_deleted_nor_resumed_by_another_process(tmp_path, gpt2_dir):
    """A populate between two commits does not hold the file, so only its claim on the run stops
    `runs --delete` and a second `--resume` (each refused in one line naming the populate's
    process, the warehouse untouched); once it has ended, or been killed, both go ahead."""
    prompts = write_prompts(tmp_path / "p.jsonl", repeat=4)  # 24 prompts, 24 batches
    db = tmp_path / "wh.duckdb"
    args = ["populate", str(prompts), "--model", str(gpt2_dir), "--db", str(db), "--top", "0",
            "--batch-size", "1", "--commit-seconds", "0"]
    pop = subprocess.Popen([*ACTWH, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                           env=ENV)
    held, seen = _hold_once_written(db, pop)  # the populate cannot finish while this is held
    assert seen < 24
    run = held.execute("SELECT max(run_id) FROM runs").fetchone()[0]
    for cmd in (["runs", "--delete", str(run), "--db", str(db)],
                ["populate", "--resume", str(run), "--db", str(db)]):
        r = subprocess.run([*ACTWH, *cmd], capture_output=True, text=True, env=ENV, timeout=120)
        assert r.returncode != 0
        assert r.stderr.strip().splitlines() == [
            f"Error: cannot {cmd[1].lstrip('-')} run {run} of {db}: process {pop.pid} is writing it "
            "(a populate or its resume); wait for it to end, or stop it first"], r.stderr
    held.close()
    out, err = pop.communicate(timeout=300)
    assert pop.returncode == 0, err
    assert invariants(db) == (1, 24, [("complete",)])  # nothing was taken from under the populate
    # a populate killed mid-run leaves no claim behind: its run can be resumed, or deleted
    pop = subprocess.Popen([*ACTWH, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                           env=ENV)
    held, _ = _hold_once_written(db, pop, after_run=run)
    assert held.execute("SELECT max(run_id) FROM runs").fetchone()[0] == run + 1
    run += 1
    pop.kill()
    pop.wait()
    held.close()
    r = subprocess.run([*ACTWH, "runs", "--delete", str(run), "--db", str(db)], capture_output=True,
                       text=True, env=ENV, timeout=120)
    assert r.returncode == 0, r.stderr
    assert invariants(db) == (1, 24, [("complete",)])


def test_a_finished_populate_releases_its_run_in_a_living_process(tmp_path, gpt2_dir):
    """The claim ends with the populate call, not with the process: a notebook that populated a
    run lets another process delete it while the notebook lives on."""
    from actwh.runner import PopulateOptions, populate

    db = tmp_path / "wh.duckdb"
    opts = PopulateOptions(prompts=str(write_prompts(tmp_path / "p.jsonl")), model=str(gpt2_dir))
    run = populate(db, opts, progress=False).run_id
    r = subprocess.run([*ACTWH, "runs", "--delete", str(run), "--db", str(db)], capture_output=True,
                       text=True, env=ENV, timeout=120)
    assert r.returncode == 0, r.stderr
