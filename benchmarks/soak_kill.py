"""Soak test: SIGKILL a real `actwh populate` at random points, many times, and check the file.

    python benchmarks/soak_kill.py --kills 200 [--model DIR] [--prompts FILE]

After every kill: the file must open, hold only whole batches (batches rows add up to the data
rows), and hold no duplicate prompt or node row; the next start resumes the run. At the end the
run must be `complete` with every prompt in. Prints one JSON line with the counts (all failures
must be 0). Not a test: it takes minutes.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import duckdb


def check(db: Path) -> dict:
    try:
        con = duckdb.connect(str(db), read_only=True)
    except duckdb.Error:
        return {"failed_open": 1}
    try:
        b = con.execute("SELECT coalesce(sum(n_prompts),0), coalesce(sum(n_node_rows),0), "
                        "coalesce(sum(n_pair_rows),0) FROM batches").fetchone()
        p = con.execute("SELECT count(*), count(DISTINCT (run_id, prompt_id)) FROM prompts").fetchone()
        n = con.execute("SELECT count(*) FROM node_scalars").fetchone()[0]
        pairs = con.execute("SELECT count(*) FROM pair_scalars").fetchone()[0]
        dup = con.execute("SELECT count(*) FROM (SELECT run_id, prompt_id, position, layer, node_type, "
                          "node_index, scalar FROM node_scalars GROUP BY ALL HAVING count(*) > 1)").fetchone()[0]
        runs = con.execute("SELECT count(*) FROM runs").fetchone()[0]
    finally:
        con.close()
    return {"failed_open": 0, "partial_batches": int(p[0] != b[0] or n != b[1] or pairs != b[2]),
            "duplicates": int(p[0] != p[1]) + int(dup > 0), "runs": runs, "prompts": p[0]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--kills", type=int, default=200)
    ap.add_argument("--model", default=None)
    ap.add_argument("--prompts", default=None)
    ap.add_argument("--max-delay", type=float, default=1.5, help="seconds after the file appears")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    rng = random.Random(args.seed)
    tmp = Path(tempfile.mkdtemp())
    db = tmp / "soak.duckdb"
    prompts = args.prompts
    if prompts is None:
        from actwh.compute.default_model import default_prompts

        rows = default_prompts("ioi").read_text().splitlines() * 4
        prompts = tmp / "prompts.jsonl"
        prompts.write_text("\n".join(rows) + "\n")
    base = [sys.executable, "-m", "actwh.cli", "populate", str(prompts), "--db", str(db),
            "--batch-size", "2", "--top", "0"] + (["--model", args.model] if args.model else [])
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    totals = {"kills": 0, "failed_open": 0, "partial_batches": 0, "duplicates": 0, "restarts": 0}
    start = time.time()
    while totals["kills"] < args.kills:
        started = db.exists() and check(db).get("runs", 0) > 0
        proc = subprocess.Popen(base + (["--resume", "1"] if started else []), env=env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        t0 = time.monotonic()
        while not db.exists() and proc.poll() is None and time.monotonic() - t0 < 120:
            time.sleep(0.01)
        time.sleep(rng.uniform(0, args.max_delay))
        if proc.poll() is not None:  # it finished first: check, then start a fresh file
            result = check(db)
            for k in ("failed_open", "partial_batches", "duplicates"):
                totals[k] += result.get(k, 0)
            db.unlink()
            totals["restarts"] += 1
            continue
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        totals["kills"] += 1
        if db.exists():
            result = check(db)
            for k in ("failed_open", "partial_batches", "duplicates"):
                totals[k] += result.get(k, 0)
    started = db.exists() and check(db).get("runs", 0) > 0
    subprocess.run(base + (["--resume", "1"] if started else []), env=env, check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    con = duckdb.connect(str(db), read_only=True)
    status = con.execute("SELECT status FROM runs WHERE run_id = 1").fetchone()[0]
    con.close()
    final = check(db)
    print(json.dumps({"name": "populate_sigkill_soak", **totals, "final_status": status,
                      "final_prompts": final["prompts"], "final_partial": final["partial_batches"],
                      "final_duplicates": final["duplicates"], "seconds": round(time.time() - start)}))


if __name__ == "__main__":
    main()
