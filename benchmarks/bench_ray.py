"""Populate on Ray vs here: throughput with 1 and 2 workers, and the driver's memory.

    python benchmarks/bench_ray.py [--repeat 8] [--batch-size 8] [--rounds 3] [--memory-prompts 96,768]

Everything in one run, same prompts (the default model's IOI prompts, repeated), default
scalars, one commit per batch (so each batch's `written_at` times it):
- `populate_local_sequential` / `populate_local_pipelined`: populate here, each step in turn vs
  the pipelined writer thread, alternating for `--rounds` rounds, medians (ratio: pipelined /
  sequential wall time);
- `populate_ray_1_worker` / `populate_ray_2_workers`: `--engine ray` on a local cluster
  (`ray.init(num_cpus=2)`), wall time including the actors' start and model load, and the steady
  throughput from the first batch written to the last (ratio to the local pipelined run's);
- `ray_driver_peak_rss`: the driver's peak RSS (a fresh process each) populating N and M
  prompts on Ray with every neuron's act × grad kept (`--select dense`: ~23k rows a prompt, so
  M prompts' rows are hundreds of MB of Arrow); ratio M / N (flat: ~1); and
  `ray_driver_peak_anon_rss`, the peak of the driver's own (anonymous) pages, sampled every
  50 ms, apart from the pages of Ray's shared object store it maps to read results.
Prints one JSON line per figure. Not a test: it measures.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import duckdb

from common import emit


def prompts_file(folder: Path, repeat: int) -> Path:
    from actwh.compute.default_model import default_prompts

    path = folder / f"ioi-x{repeat}.jsonl"
    path.write_text(default_prompts("ioi").read_text() * repeat)
    return path


def steady_tokens_per_s(db: Path, run: int) -> float:
    """Tokens per second from the first batch written to the last (the batches after the first,
    counted as (n - 1) / n of the run's tokens: equal-sized batches)."""
    con = duckdb.connect(str(db), read_only=True)
    try:
        times = sorted(r[0] for r in con.execute(
            "SELECT written_at FROM batches WHERE run_id = $r", {"r": run}).fetchall())
        tokens = con.execute("SELECT sum(n_tokens) FROM prompts WHERE run_id = $r", {"r": run}).fetchone()[0]
    finally:
        con.close()
    n = len(times)
    span = (times[-1] - times[0]).total_seconds()
    return tokens * (n - 1) / n / span if span > 0 and n > 1 else float("nan")


NODE_ROW_BYTES = 27  # run, prompt, position, node_index: int32; layer: int16; codes: int8; value: float32
DRIVER = """
import resource, sys, threading, time
from actwh.runner import PopulateOptions, populate
from actwh.ray_engine import RayEngine
peak = {"RssAnon": 0, "RssShmem": 0, "RssFile": 0}
def sample():
    while True:
        for line in open("/proc/self/status"):
            key, _, value = line.partition(":")
            if key in peak:
                peak[key] = max(peak[key], int(value.split()[0]) * 1024)
        time.sleep(0.05)
threading.Thread(target=sample, daemon=True).start()
r = populate(sys.argv[1], PopulateOptions(prompts=sys.argv[2], batch_size=int(sys.argv[3]),
                                          select="dense", scalars=("mlp_act_times_grad",)),
             progress=False, engine=RayEngine(workers=2))
assert r.status == "complete"
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, r.rows["node_scalars"],
      peak["RssAnon"], peak["RssShmem"])
"""


def throughput(args, tmp: Path) -> None:
    import ray

    from actwh.ray_engine import RayEngine
    from actwh.runner import PopulateOptions, populate

    path = prompts_file(tmp, args.repeat)
    opts = PopulateOptions(prompts=str(path), batch_size=args.batch_size)
    populate(tmp / "warm.duckdb", PopulateOptions(prompts=str(path), batch_size=64), progress=False)
    n_prompts = 24 * args.repeat
    common = dict(model="default", batch=args.batch_size, prompts=n_prompts)
    times, steady = {}, {}
    rounds: dict[str, list] = {"local_sequential": [], "local_pipelined": []}
    for i in range(args.rounds):  # alternating, so that the machine's drift lands on both
        for name, kw in (("local_sequential", {"pipelined": False}), ("local_pipelined", {})):
            db = tmp / f"{name}-{i}.duckdb"
            t0 = time.perf_counter()
            r = populate(db, opts, progress=False, commit_seconds=0, **kw)
            rounds[name].append((time.perf_counter() - t0, steady_tokens_per_s(db, r.run_id)))
            tokens = r.tokens
    for name, got in rounds.items():
        times[name] = statistics.median(t for t, _ in got)
        steady[name] = statistics.median(v for _, v in got)
    emit("populate_local_sequential", times["local_sequential"], "s", **common,
         tokens_per_s=round(tokens / times["local_sequential"]))
    emit("populate_local_pipelined", times["local_pipelined"], "s", "local_sequential",
         times["local_sequential"], **common, tokens_per_s=round(tokens / times["local_pipelined"]))
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    for workers in (1, 2):
        name = f"ray_{workers}"
        db = tmp / f"{name}.duckdb"
        t0 = time.perf_counter()
        r = populate(db, opts, progress=False, commit_seconds=0, engine=RayEngine(workers=workers))
        times[name] = time.perf_counter() - t0
        steady[name] = steady_tokens_per_s(db, r.run_id)
        emit(f"populate_ray_{workers}_worker{'s' if workers > 1 else ''}", times[name], "s",
             "local_pipelined", times["local_pipelined"], **common,
             tokens_per_s=round(tokens / times[name]),
             steady_tokens_per_s=round(steady[name]),
             steady_ratio_to_local=round(steady[name] / steady["local_pipelined"], 3),
             local_steady_tokens_per_s=round(steady["local_pipelined"]))
    ray.shutdown()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=8, help="copies of the 24 IOI prompts")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=3, help="alternating local rounds (median)")
    ap.add_argument("--only-memory", action="store_true")
    ap.add_argument("--memory-prompts", default="96,768",
                    help="N,M prompts for the memory figure (dense mlp_act_times_grad rows)")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp())
    if not args.only_memory:
        throughput(args, tmp)
    rss = {}
    for n in map(int, args.memory_prompts.split(",")):
        p = prompts_file(tmp, max(1, n // 24))
        out = subprocess.run([sys.executable, "-c", DRIVER, str(tmp / f"mem{n}.duckdb"), str(p),
                              str(args.batch_size)], capture_output=True, text=True,
                             env={**os.environ, "OMP_NUM_THREADS": "1"})
        if out.returncode:
            raise SystemExit(out.stderr[-2000:])
        rss[n] = tuple(map(int, out.stdout.strip().splitlines()[-1].split()))
    (a, (ra, na, aa, sa)), (b, (rb, nb, ab, sb)) = sorted(rss.items())[0], sorted(rss.items())[-1]
    emit("ray_driver_peak_rss", rb / 2**20, "MiB", f"{a}_prompts", ra / 2**20, model="default",
         batch=args.batch_size, prompts=b, baseline_prompts=a, node_rows=nb,
         baseline_node_rows=na, node_rows_arrow_mib=round(nb * NODE_ROW_BYTES / 2**20))
    # The driver's own memory (anonymous pages) apart from the pages of Ray's shared object
    # store it has mapped to read results (RssShmem; the store's size bounds them).
    emit("ray_driver_peak_anon_rss", ab / 2**20, "MiB", f"{a}_prompts", aa / 2**20,
         model="default", batch=args.batch_size, prompts=b, baseline_prompts=a,
         peak_shmem_mib=round(sb / 2**20), baseline_peak_shmem_mib=round(sa / 2**20))


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).parent))
    main()
