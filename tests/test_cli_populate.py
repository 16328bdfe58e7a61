"""`actwh populate` end to end: kills at random points, concurrent readers and writers, bad input."""

from __future__ import annotations

import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import time

import duckdb
import pytest
from click.testing import CliRunner

from actwh.cli.main import cli

from conftest import IOI_ROWS, write_prompts

ACTWH = [sys.executable, "-m", "actwh.cli"]


def spawn(args, **kw):
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([*ACTWH, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env, **kw)


def invariants(db):
    """The file opens; it holds only whole batches; no prompt appears twice."""
    con = duckdb.connect(str(db), read_only=True)
    try:
        runs = con.execute("SELECT count(*) FROM runs").fetchone()[0]
        b = con.execute("SELECT coalesce(sum(n_prompts), 0), coalesce(sum(n_node_rows), 0), "
                        "coalesce(sum(n_pair_rows), 0) FROM batches").fetchone()
        prompts = con.execute("SELECT count(*), count(DISTINCT (run_id, prompt_id)) FROM prompts").fetchone()
        nodes = con.execute("SELECT count(*) FROM node_scalars").fetchone()[0]
        pairs = con.execute("SELECT count(*) FROM pair_scalars").fetchone()[0]
        dups = con.execute("SELECT count(*) FROM (SELECT run_id, prompt_id, position, layer, node_type, "
                           "node_index, scalar, count(*) c FROM node_scalars GROUP BY ALL HAVING c > 1)"
                           ).fetchone()[0]
        status = con.execute("SELECT status FROM runs WHERE run_id = 1").fetchall()
    finally:
        con.close()
    assert prompts[0] == prompts[1] == b[0], "a prompt is duplicated or a batch is partial"
    assert (nodes, pairs) == (b[1], b[2]), "rows of a partial batch are present"
    assert dups == 0
    return runs, prompts[0], status


def test_sigkill_at_random_points_then_resume_completes(tmp_path, gpt2_dir):
    prompts = write_prompts(tmp_path / "p.jsonl", repeat=6)  # 36 prompts
    db = tmp_path / "wh.duckdb"
    args = ["populate", str(prompts), "--model", str(gpt2_dir), "--db", str(db), "--batch-size", "1",
            "--top", "0"]
    rng = random.Random(7)
    kills = 0
    resume = ["populate", "--db", str(db), "--top", "0", "--resume", "1"]  # options are stored
    while kills < 6:
        started = db.exists() and invariants(db)[0] > 0
        proc = spawn(resume if started else args)
        t0 = time.monotonic()
        while not db.exists() and proc.poll() is None and time.monotonic() - t0 < 60:
            time.sleep(0.02)
        time.sleep(rng.uniform(0.0, 1.2))
        if proc.poll() is not None:  # finished before the kill: start over in a fresh file
            assert proc.returncode == 0, proc.stderr.read()
            db.unlink()
            continue
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        kills += 1
        if db.exists():
            invariants(db)
    started = db.exists() and invariants(db)[0] > 0
    done = subprocess.run([*ACTWH, *(resume if started else args)],
                          capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr
    runs, n_prompts, status = invariants(db)
    assert (runs, n_prompts, status) == (1, 36, [("complete",)])


def test_sql_answers_while_populate_runs_and_second_writer_waits(tmp_path, gpt2_dir):
    prompts = write_prompts(tmp_path / "p.jsonl", repeat=4)
    db = tmp_path / "wh.duckdb"
    base = ["populate", str(prompts), "--model", str(gpt2_dir), "--db", str(db), "--batch-size", "1",
            "--top", "0"]
    first = spawn(base)
    while not db.exists() and first.poll() is None:
        time.sleep(0.02)
    second = spawn(base)
    seen = []
    runner = CliRunner()
    while first.poll() is None and len(seen) < 20:
        r = runner.invoke(cli, ["sql", "SELECT count(*) AS n FROM prompts WHERE run_id = $run",
                                "-p", "run=1", "--db", str(db), "--format", "csv"])
        if r.exit_code == 0:
            seen.append(int(r.output.splitlines()[1]))
        time.sleep(0.05)
    out1, err1 = first.communicate(timeout=300)
    out2, err2 = second.communicate(timeout=300)
    assert first.returncode == 0 and second.returncode == 0, (err1, err2)
    assert "Traceback" not in err1 + err2
    assert "tokens/s" not in err1 + err2  # progress stays quiet when stderr is not a terminal
    assert seen and seen == sorted(seen) and max(seen) <= 24  # committed batches only, growing
    runs, n, _ = invariants(db)
    assert runs == 2 and n == 48  # both runs whole: the writers took turns batch by batch


def file_digest(path):
    return hashlib.sha256(path.read_bytes()).hexdigest() if path.exists() else None


@pytest.mark.parametrize("case", ["missing_file", "malformed_jsonl", "unknown_scalar",
                                  "multi_token_target", "too_long", "unknown_resume"])
def test_bad_input_is_one_line_error_and_leaves_file_unchanged(tmp_path, gpt2_dir, case):
    db = tmp_path / "wh.duckdb"
    good = write_prompts(tmp_path / "good.jsonl")
    runner = CliRunner()
    base = ["--model", str(gpt2_dir), "--db", str(db), "--top", "0"]
    assert runner.invoke(cli, ["populate", str(good), *base]).exit_code == 0
    before = file_digest(db)
    prompts, extra, expect = str(good), [], ""
    if case == "missing_file":
        prompts, expect = str(tmp_path / "nope.jsonl"), "not found"
    elif case == "malformed_jsonl":
        bad = tmp_path / "bad.jsonl"
        bad.write_text(json.dumps(IOI_ROWS[0]) + "\n{not json\n")
        prompts, expect = str(bad), "bad.jsonl:2"
    elif case == "unknown_scalar":
        extra, expect = ["--scalars", "mlp_post_act,mlp_psot_act"], "unknown scalar 'mlp_psot_act'"
    elif case == "multi_token_target":
        bad = write_prompts(tmp_path / "multi.jsonl", [{**IOI_ROWS[0], "target": "Mary John"}])
        prompts, expect = str(bad), "is 2 tokens"
    elif case == "too_long":
        bad = write_prompts(tmp_path / "long.jsonl", [{"text": " ".join(["the"] * 70)}])
        prompts, expect = str(bad), "longer than the context"
    elif case == "unknown_resume":
        extra, expect = ["--resume", "42"], "no run 42"
    args = ["populate", prompts, *base, *extra]
    if case == "unknown_resume":  # a resume takes its options from the run
        args = ["populate", "--db", str(db), "--top", "0", *extra]
    result = runner.invoke(cli, args)
    assert result.exit_code != 0
    lines = [l for l in result.output.splitlines() if l.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error:") and expect in lines[0], result.output
    assert file_digest(db) == before


def test_sql_binds_parameters_never_pastes_them(tmp_path, gpt2_dir):
    db = tmp_path / "wh.duckdb"
    runner = CliRunner()
    good = write_prompts(tmp_path / "good.jsonl")
    assert runner.invoke(cli, ["populate", str(good), "--model", str(gpt2_dir), "--db", str(db),
                               "--top", "0"]).exit_code == 0
    hostile = "x' OR '1'='1"
    r = runner.invoke(cli, ["sql", "SELECT count(*) AS n FROM prompts WHERE text = $t",
                            "-p", f"t={hostile}", "--db", str(db), "--format", "csv"])
    assert r.exit_code == 0 and r.output.splitlines()[1] == "0"
    r = runner.invoke(cli, ["sql", "SELECT count(*) AS n FROM prompts WHERE text = $t",
                            "-p", f"t={IOI_ROWS[2]['text']}", "--db", str(db), "--format", "csv"])
    assert r.output.splitlines()[1] == "1"
    r = runner.invoke(cli, ["sql", "SELECT $missing", "--db", str(db)])
    assert r.exit_code != 0 and "Traceback" not in r.output
