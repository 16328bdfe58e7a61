"""Soak test: SIGKILL a real `actwh populate` at random points, many times, and check the file.

    python benchmarks/soak_kill.py --kills 200 [--modes plain,edges,sae,grouped] [--model DIR]

Modes (each on its own warehouse): `plain` (one commit per batch), `edges` (component graph
and node-level edges into the top nodes), `sae` (a seeded random SAELens autoencoder spliced
in, its latents stored), `grouped` (small batches grouped into one commit, the default
--commit-seconds). Each kill falls at a random time within
an uninterrupted run's duration (measured first). After every kill: the file must open, hold only whole batches (batches rows
add up to the prompts, node, pair and edge rows), and hold no duplicate prompt, node or edge
row; the next start resumes the run with `--resume 1` alone (the run's options are stored). At
the end each run must be `complete` with every prompt in. Prints one JSON line per mode (all
failures must be 0). Not a test: it takes minutes.
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

MODES = {
    "plain": ["--batch-size", "2", "--commit-seconds", "0"],
    "edges": ["--batch-size", "2", "--commit-seconds", "0", "--edges", "--edges-into", "top:2",
              "--edges-select", "top-k:20"],
    "sae": ["--batch-size", "2", "--commit-seconds", "0", "--select", "dense",
            "--scalars", "mlp_act_times_grad,sae_latent_act,sae_act_times_grad,sae_error_act_times_grad"],
    "grouped": ["--batch-size", "1", "--commit-seconds", "0.5"],
}


def check(db: Path) -> dict:
    try:
        con = duckdb.connect(str(db), read_only=True)
    except duckdb.Error:
        return {"failed_open": 1}
    try:
        b = con.execute("SELECT coalesce(sum(n_prompts),0), coalesce(sum(n_node_rows),0), "
                        "coalesce(sum(n_pair_rows),0), coalesce(sum(n_edge_rows),0) FROM batches").fetchone()
        p = con.execute("SELECT count(*), count(DISTINCT (run_id, prompt_id)) FROM prompts").fetchone()
        n = con.execute("SELECT count(*) FROM node_scalars").fetchone()[0]
        pairs = con.execute("SELECT count(*) FROM pair_scalars").fetchone()[0]
        edges = con.execute("SELECT count(*) FROM edges").fetchone()[0]
        dup = con.execute("SELECT count(*) FROM (SELECT run_id, prompt_id, position, layer, node_type, "
                          "node_index, scalar FROM node_scalars GROUP BY ALL HAVING count(*) > 1)").fetchone()[0]
        dup_edges = con.execute("SELECT count(*) FROM (SELECT run_id, prompt_id, up_layer, up_type, up_index, "
                                "up_pos, down_layer, down_type, down_index, down_pos, down_input FROM edges "
                                "GROUP BY ALL HAVING count(*) > 1)").fetchone()[0]
        runs = con.execute("SELECT count(*) FROM runs").fetchone()[0]
    finally:
        con.close()
    return {"failed_open": 0,
            "partial_batches": int(p[0] != b[0] or n != b[1] or pairs != b[2] or edges != b[3]),
            "duplicates": int(p[0] != p[1]) + int(dup > 0) + int(dup_edges > 0), "runs": runs,
            "prompts": p[0], "edges": edges}


def write_sae(folder: Path, d_model: int, site: str) -> Path:
    import torch
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(0)
    d_sae = 4 * d_model
    folder.mkdir(parents=True, exist_ok=True)
    save_file({"W_enc": torch.randn(d_model, d_sae, generator=g) * 0.1,
               "b_enc": torch.randn(d_sae, generator=g) * 0.05,
               "W_dec": torch.randn(d_sae, d_model, generator=g) * 0.1,
               "b_dec": torch.randn(d_model, generator=g) * 0.05}, folder / "sae_weights.safetensors")
    (folder / "cfg.json").write_text(json.dumps({"d_in": d_model, "d_sae": d_sae, "architecture": "standard",
                                                 "apply_b_dec_to_input": True,
                                                 "metadata": {"hook_name": site}}))
    return folder


def soak(mode: str, kills: int, base: list[str], tmp: Path, rng: random.Random, max_delay: float,
         env: dict) -> dict:
    db = tmp / f"soak-{mode}.duckdb"
    args = [*base, "--db", str(db), *MODES[mode]]
    if mode == "sae":
        args += ["--sae", str(tmp / "sae")]
    resume = [*base[:base.index("populate") + 1], "--db", str(db), "--top", "0", "--resume", "1"]
    # One uninterrupted run first: kills then fall anywhere in a run of that length (start-up,
    # model loading, computing, committing), not only in the first moments.
    t0 = time.monotonic()
    subprocess.run(args, env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    full_s = time.monotonic() - t0
    db.unlink()
    totals = {"kills": 0, "failed_open": 0, "partial_batches": 0, "duplicates": 0, "restarts": 0,
              "kills_after_progress": 0, "full_run_s": round(full_s, 1)}
    start = time.time()
    before = 0
    while totals["kills"] < kills:
        started = db.exists() and check(db).get("runs", 0) > 0
        proc = subprocess.Popen(resume if started else args, env=env, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        time.sleep(rng.uniform(0, full_s * max_delay))
        if proc.poll() is not None:  # it finished first: check, then start a fresh file
            if proc.returncode != 0:
                raise SystemExit(f"{mode}: populate exited {proc.returncode}: {' '.join(proc.args)}")
            result = check(db)
            for k in ("failed_open", "partial_batches", "duplicates"):
                totals[k] += result.get(k, 0)
            db.unlink()
            totals["restarts"] += 1
            before = 0
            continue
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        totals["kills"] += 1
        if db.exists():
            result = check(db)
            for k in ("failed_open", "partial_batches", "duplicates"):
                totals[k] += result.get(k, 0)
            totals["kills_after_progress"] += int(result.get("prompts", 0) > before)
            before = result.get("prompts", 0)
    started = db.exists() and check(db).get("runs", 0) > 0
    subprocess.run(resume if started else args, env=env, check=True, stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL)
    con = duckdb.connect(str(db), read_only=True)
    status, n_prompts = con.execute("SELECT status, n_prompts FROM runs WHERE run_id = 1").fetchone()
    con.close()
    final = check(db)
    leftovers = [p.name for p in tmp.iterdir() if p.name.startswith(f".{db.name}.")]
    return {"name": "populate_sigkill_soak", "mode": mode, **totals, "final_status": status,
            "leftover_files": len(leftovers),
            "final_prompts": final["prompts"], "expected_prompts": n_prompts,
            "final_edges": final["edges"], "final_partial": final["partial_batches"],
            "final_duplicates": final["duplicates"], "seconds": round(time.time() - start)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--kills", type=int, default=200, help="per mode")
    ap.add_argument("--modes", default=",".join(MODES))
    ap.add_argument("--model", default=None)
    ap.add_argument("--prompts", default=None)
    ap.add_argument("--max-delay", type=float, default=1.0,
                    help="kill within this fraction of an uninterrupted run's duration")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    rng = random.Random(args.seed)
    tmp = Path(tempfile.mkdtemp())
    prompts = args.prompts
    if prompts is None:
        from actwh.compute.default_model import default_prompts

        rows = default_prompts("ioi").read_text().splitlines() * 4
        prompts = tmp / "prompts.jsonl"
        prompts.write_text("\n".join(rows) + "\n")
    base = [sys.executable, "-m", "actwh.cli", "populate", str(prompts), "--top", "0"] + (
        ["--model", args.model] if args.model else [])
    modes = args.modes.split(",")
    if "sae" in modes:
        from actwh.compute.loading import load_model

        write_sae(tmp / "sae", load_model(args.model, device="cpu").model.cfg.d_model, "blocks.1.hook_resid_pre")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for mode in modes:
        print(json.dumps(soak(mode, args.kills, base, tmp, rng, args.max_delay, env)), flush=True)


if __name__ == "__main__":
    main()
