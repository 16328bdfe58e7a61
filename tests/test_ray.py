"""`populate --engine ray`: a local Ray cluster (2 CPUs, started once for the module) computes the
batches on a pool of actors and the driver writes them. The rows equal a local run's, row by
row; a worker SIGKILLed mid-run is replaced and the run completes with every prompt once; a Ray
run interrupted resumes (on Ray, from another process joining the cluster by its address) to a
clean run's rows; bad input is refused before any worker
starts. Skipped when Ray is not installed (`pip install 'actwh[ray]'`)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time

import pytest
from click.testing import CliRunner

ray = pytest.importorskip("ray")

from actwh.cli.main import cli  # noqa: E402
from actwh.errors import ActwhError  # noqa: E402
from actwh.ray_engine import RayEngine, WorkersAlive  # noqa: E402
from actwh.runner import EdgeOptions, PopulateOptions, Progress, populate  # noqa: E402
from actwh.warehouse.store import WarehouseWriter  # noqa: E402

from conftest import IOI_ROWS, write_prompts  # noqa: E402
from test_pipeline import dump, whole_batches  # noqa: E402
from test_sae import write_saelens  # noqa: E402


@pytest.fixture(scope="module")
def cluster():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    yield
    ray.shutdown()


def compute_actors() -> dict[int, str]:
    """pid -> state of every RayCompute actor the cluster has seen."""
    from ray._private import state

    return {a["Pid"]: a["State"] for a in state.actors().values()
            if "RayCompute" in a.get("ActorClassName", "")}


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, gpt2_dir):
    """Mixed prompt lengths, an SAE spliced, component and node-level edges with the corrupt
    baseline, an attribution scalar against the mean baseline (its means taken by the driver)."""
    tmp = tmp_path_factory.mktemp("ray")
    sae, _ = write_saelens(tmp / "sae", 32, 16, "blocks.0.hook_mlp_out")
    rows = [r for r in IOI_ROWS if "corrupt" in r]
    prompts = write_prompts(tmp / "p.jsonl", rows=rows + [
        {**rows[0], "text": rows[0]["text"] + " and", "corrupt": rows[0]["corrupt"] + " and"},
        {**rows[1], "text": "then " + rows[1]["text"], "corrupt": "then " + rows[1]["corrupt"]}],
        repeat=2)
    opts = PopulateOptions(prompts=str(prompts), model=str(gpt2_dir), batch_size=2,
                           scalars=("mlp_act_times_grad", "attn_act_times_grad", "attn_pattern",
                                    "sae_act_times_grad", "mlp_attribution"),
                           select="top-k:7:mlp_act_times_grad", saes=((str(sae), None),),
                           edges=EdgeOptions(baseline="corrupt", select="top-k:9", into=2),
                           baseline="mean")
    local = populate(tmp / "local.duckdb", opts, progress=False, pipelined=False)
    return tmp, opts, local


def stored(db, run: int) -> dict:
    """`dump` through the reader that reads a DuckDB file, a lake and a Parquet folder alike."""
    from actwh.warehouse import Warehouse

    from test_pipeline import TABLES, _plain

    with Warehouse(db) as wh:
        # t: a table name from test_pipeline's fixed TABLES tuple (identifiers cannot be bound)
        out = {t: [tuple(map(_plain, r)) for r in wh.sql(
            f"SELECT * EXCLUDE (run_id) FROM {t} WHERE run_id = $r ORDER BY ALL", r=run).rows()]
            for t in TABLES}
        out["batches"] = [tuple(r) for r in wh.sql(
            "SELECT n_prompts, n_node_rows, n_pair_rows, n_edge_rows FROM batches WHERE run_id = $r "
            "ORDER BY ALL", r=run).rows()]
    return out


@pytest.mark.parametrize("storage", ["file", "lake", "parquet"])
def test_two_workers_write_exactly_the_local_rows(cluster, inputs, storage):
    """Into a DuckDB file the driver writes; into a lake or a Parquet folder each worker commits
    its own batches."""
    if storage != "file":
        pytest.importorskip("actwh.warehouse.spec", reason="the lake and folder storages")
    tmp, opts, local = inputs
    db = {"file": str(tmp / "ray.duckdb"), "lake": f"lake:{tmp / 'lake'}",
          "parquet": f"parquet:{tmp / 'shards'}"}[storage]
    got = populate(db, opts, progress=False, engine=RayEngine(workers=2))
    a, b = dump(tmp / "local.duckdb", local.run_id), stored(db, got.run_id)
    assert len(a["prompts"]) == 8 and len(a["batches"]) == 4
    assert all(a[t] for t in a), {t: len(a[t]) for t in a}  # every kind of row is there
    assert a == b
    assert got.status == "complete" and got.rows == local.rows and got.tokens == local.tokens
    assert got.completeness == pytest.approx(local.completeness, rel=1e-6)
    assert len(compute_actors()) >= 2  # the pool really had two actors


def test_a_worker_killed_mid_run_is_replaced_and_every_prompt_lands_once(cluster, tmp_path, gpt2_dir):
    prompts = write_prompts(tmp_path / "p.jsonl", repeat=2)  # 12 prompts, one per batch
    opts = PopulateOptions(prompts=str(prompts), model=str(gpt2_dir), batch_size=1,
                           scalars=("mlp_act_times_grad", "attn_act_times_grad"), edges=EdgeOptions())
    before = set(compute_actors())
    written, real = threading.Event(), WarehouseWriter.queue_batch
    calls = []

    def queue_batch(self, run_id, tables):
        calls.append(1)
        if len(calls) == 2:
            written.set()
        return real(self, run_id, tables)

    WarehouseWriter.queue_batch = queue_batch
    result, errors = [], []
    worker = threading.Thread(target=lambda: _run(result, errors, tmp_path / "ray.duckdb", opts))
    try:
        worker.start()
        assert written.wait(timeout=300), errors
        alive = [pid for pid, st in compute_actors().items() if pid not in before and st == "ALIVE"]
        assert alive, compute_actors()
        shown = WorkersAlive()()  # the driver's progress line (the 2nd actor may be starting)
        now = [p for p, st in compute_actors().items() if p not in before and st == "ALIVE"]
        assert shown in {f"  workers alive {n}" for n in range(len(alive), len(now) + 1)}, shown
        os.kill(alive[0], signal.SIGKILL)
        worker.join(timeout=300)
    finally:
        WarehouseWriter.queue_batch = real
    assert not errors and result and result[0].status == "complete", errors
    assert compute_actors().get(alive[0]) == "DEAD" or alive[0] not in compute_actors()
    assert whole_batches(tmp_path / "ray.duckdb") == {"batches": 12, "prompts": 12,
                                                      "status": [("complete",)]}
    clean = populate(tmp_path / "local.duckdb", opts, progress=False, pipelined=False)
    assert dump(tmp_path / "ray.duckdb", 1) == dump(tmp_path / "local.duckdb", clean.run_id)


def _run(result, errors, db, opts):
    try:
        result.append(populate(db, opts, progress=False, commit_seconds=0,
                               engine=RayEngine(workers=2)))
    except BaseException as e:  # noqa: BLE001 (reported by the test)
        errors.append(e)


def test_an_interrupted_ray_run_resumes_on_ray_to_a_clean_runs_rows(cluster, inputs, monkeypatch):
    tmp, opts, local = inputs
    db = tmp / "resumed.duckdb"
    real, calls = WarehouseWriter.queue_batch, []

    def queue_batch(self, run_id, tables):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(self, run_id, tables)

    monkeypatch.setattr(WarehouseWriter, "queue_batch", queue_batch)
    with pytest.raises(KeyboardInterrupt):
        populate(db, opts, progress=False, commit_seconds=0, engine=RayEngine(workers=2))
    monkeypatch.setattr(WarehouseWriter, "queue_batch", real)
    assert whole_batches(db) == {"batches": 2, "prompts": 4, "status": [("running",)]}
    # The resume runs in another process that joins this cluster by its address.
    address = ray.get_runtime_context().gcs_address
    r = subprocess.run([sys.executable, "-m", "actwh.cli", "populate", "--db", str(db), "--resume", "1",
                        "--top", "0", "--engine", "ray", "--address", address, "--workers", "2"],
                       capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0 and "run 1: complete, 4 prompts written" in r.stderr, r.stderr[-3000:]
    assert dump(db, 1) == dump(tmp / "local.duckdb", local.run_id)


@pytest.mark.parametrize("case", ["missing file", "bad line", "unknown scalar", "unreachable",
                                  "bad address", "workers", "too many workers"])
def test_bad_input_fails_before_any_worker_starts(cluster, tmp_path, gpt2_dir, case):
    prompts = write_prompts(tmp_path / "p.jsonl")
    args = ["populate", str(prompts), "--db", str(tmp_path / "wh.duckdb"), "--model", str(gpt2_dir),
            "--top", "0", "--engine", "ray", "--workers", "2"]
    expect = {"missing file": "no-such.jsonl not found", "bad line": "p.jsonl:2: malformed JSON",
              "unknown scalar": "unknown scalar 'mlp_act_time_grad'",
              "unreachable": "--address 127.0.0.1:9: no Ray cluster answers there",
              "bad address": "--address 'nowhere': give auto or HOST:PORT",
              "workers": "--workers must be a whole number >= 1, not 0",
              "too many workers": "--workers 3 with cpus per worker 1 need 3 CPUs; the Ray cluster "
                                  "has 2"}[case]
    if case == "missing file":
        args[1] = str(tmp_path / "no-such.jsonl")
    elif case == "bad line":
        lines = prompts.read_text().splitlines()
        lines[1] = "{not json"
        prompts.write_text("\n".join(lines) + "\n")
    elif case == "unknown scalar":
        args += ["--scalars", "mlp_act_time_grad"]
    elif case == "unreachable":
        args += ["--address", "127.0.0.1:9"]
    elif case == "bad address":
        args += ["--address", "nowhere"]
    else:
        args[args.index("--workers") + 1] = "0" if case == "workers" else "3"
    actors = compute_actors()
    started = time.monotonic()
    r = CliRunner().invoke(cli, args)
    lines = r.output.strip().splitlines()
    assert r.exit_code == 1 and len(lines) == 1 and expect in lines[0], r.output
    assert not (tmp_path / "wh.duckdb").exists()
    assert compute_actors() == actors  # no worker was started
    assert time.monotonic() - started < 60


def test_engine_flags_need_the_engine_and_ray_is_not_imported_without_it(tmp_path, gpt2_dir):
    r = CliRunner().invoke(cli, ["populate", str(write_prompts(tmp_path / "p.jsonl")), "--db",
                                 str(tmp_path / "wh.duckdb"), "--workers", "2"])
    assert r.exit_code == 1 and r.output.strip() == "Error: --workers applies to --engine ray"
    code = ("import sys; from actwh.runner import PopulateOptions, populate; "
            f"populate({str(tmp_path / 'a.duckdb')!r}, PopulateOptions(prompts={str(tmp_path / 'p.jsonl')!r}, "
            f"model={str(gpt2_dir)!r}, scalars=('mlp_act_times_grad',)), progress=False); "
            "import actwh.cli.main; print(sorted(m for m in sys.modules if m == 'ray' or m.startswith('ray.')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0 and out.stdout.strip() == "[]", out.stderr[-2000:]
    with pytest.raises(ActwhError, match="--gpus-per-worker must be a number >= 0"):
        RayEngine(gpus_per_worker=-1).validate()


def test_progress_shows_prompts_rate_eta_and_workers_on_a_terminal_only(capsys):
    bar = Progress(4, enabled=True, extra=lambda: "  workers alive 2")
    bar.update(1, 30)
    line = capsys.readouterr().err
    assert line.startswith("\r1/4 prompts  ") and " tokens/s  ETA " in line, line
    assert line.rstrip().endswith("s  workers alive 2"), line
    quiet = Progress(4)  # stderr is not a terminal here (piped)
    quiet.update(1, 30)
    quiet.close()
    assert not quiet.enabled and capsys.readouterr().err == ""
