"""The circuit page on a big warehouse: time to its first drawing, measured in the browser.

Builds a warehouse holding a real run (the default model on its IOI prompts, with edges: the
baseline) and a synthetic run of 10 M component edges, bulk-loaded from Arrow: a GPT-2-small
shaped graph (12 layers, 12 heads, an MLP per layer, embeddings, the target; positions summed),
10,000 edges per prompt drawn from the ~31,000 possible ones with heavy-tailed values, over 1,000
prompts. Then `actwh view` serves it and headless Chromium (Debian's, via Playwright) opens the
circuit page (influence pruning, default thresholds) of random prompts, reading two marks the
page sets: "circuit-drawn" (the SVG is in the DOM) and "circuit-painted" (the first frame after
it), both in ms from navigation start, so the server's SQL and pruning are included.

    python benchmarks/bench_views.py [--edges 10_000_000] [--per-prompt 10000] [--db FILE]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import threading
import time
from pathlib import Path

import duckdb
import numpy as np
import pyarrow as pa

from common import emit

CHROMIUM_ARGS = ["--no-sandbox", "--headless", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run",
                 "--disable-dev-shm-usage"]
N_LAYERS, N_HEADS, N_TOK = 12, 12, 16


def candidate_edges():
    """Every component edge of the GPT-2-small shape: (up layer, type, index) → (down ..., input)."""
    ups, downs = [("embed", -1, 0)], []
    for layer in range(N_LAYERS):
        heads = [("attn_head", layer, h) for h in range(N_HEADS)]
        for h in heads:
            downs += [(h, inp) for inp in ("q", "k", "v")]
        downs.append((("mlp", layer, 0), None))
        ups += heads + [("mlp", layer, 0)]
    downs.append((("logit", N_LAYERS, 7), None))
    order = {u: i for i, u in enumerate(ups)}
    rows = []
    for (d, inp) in downs:
        dt, dl, di = d
        for u in ups:
            ut, ul, ui = u
            # a head reads the residual stream before its layer; an MLP also after its heads
            if ul < dl or (dt == "mlp" and ul == dl and ut == "attn_head") or dt == "logit":
                if u != d and order[u] < (order.get(d, len(ups))):
                    rows.append((ul, ut, ui, dl, dt, di, inp))
    return rows


def build(db: Path, n_edges: int, per_prompt: int) -> tuple[int, int]:
    """A real run (1) by populate, then the synthetic run (2) bulk-loaded from Arrow."""
    from actwh.compute.default_model import default_prompts
    from actwh.runner import EdgeOptions, PopulateOptions, populate

    populate(db, PopulateOptions(prompts=str(default_prompts("ioi")), device="cpu",
                                 edges=EdgeOptions(select="top-k:50")), progress=False)
    cand = candidate_edges()
    n_cand = len(cand)
    cols = list(zip(*cand))
    types = ["embed", "attn_head", "mlp", "mlp_neuron", "sae_latent", "sae_error", "logit"]
    con = duckdb.connect(str(db))
    types = [r[0] for r in con.execute("SELECT unnest(enum_range(NULL::node_type))::VARCHAR").fetchall()]
    code = {t: i for i, t in enumerate(types)}
    up_layer = np.array(cols[0], np.int16)
    up_type = np.array([code[t] for t in cols[1]], np.int8)
    up_index = np.array(cols[2], np.int32)
    down_layer = np.array(cols[3], np.int16)
    down_type = np.array([code[t] for t in cols[4]], np.int8)
    down_index = np.array(cols[5], np.int32)
    inputs = ["q", "k", "v"]
    down_input = np.array([-1 if i is None else inputs.index(i) for i in cols[6]], np.int8)
    to_logit = np.flatnonzero(down_type == code["logit"])
    rest = np.flatnonzero(down_type != code["logit"])
    n_prompts = n_edges // per_prompt
    rng = np.random.default_rng(0)
    con.execute("INSERT INTO models BY NAME SELECT * REPLACE (99 AS model_id, "
                "'synthetic GPT-2-small shape' AS name, 12 AS n_layers, 12 AS n_heads) "
                "FROM models WHERE model_id = (SELECT model_id FROM runs WHERE run_id = 1)")
    con.execute("INSERT INTO runs BY NAME SELECT * REPLACE (2 AS run_id, 99 AS model_id, "
                "'synthetic 10M edges' AS name, $n AS n_prompts) FROM runs WHERE run_id = 1",
                {"n": n_prompts})
    step = 100  # prompts per Arrow batch
    t0 = time.perf_counter()
    for first in range(0, n_prompts, step):
        idx, pid = [], []
        for p in range(first, min(first + step, n_prompts)):
            pick = np.concatenate([to_logit, rng.choice(rest, per_prompt - len(to_logit), replace=False)])
            idx.append(np.sort(pick))
            pid.append(np.full(per_prompt, p, np.int32))
        idx, pid = np.concatenate(idx), np.concatenate(pid)
        n = len(idx)
        value = (rng.standard_normal(n) * rng.lognormal(0, 1.5, n) * 0.05).astype(np.float32)
        inp = down_input[idx]
        edges = pa.table({
            "run_id": pa.array(np.full(n, 2, np.int32)), "prompt_id": pa.array(pid),
            "up_layer": pa.array(up_layer[idx]),
            "up_type": pa.DictionaryArray.from_arrays(pa.array(up_type[idx]), pa.array(types)),
            "up_index": pa.array(up_index[idx]), "up_pos": pa.nulls(n, pa.int32()),
            "down_layer": pa.array(down_layer[idx]),
            "down_type": pa.DictionaryArray.from_arrays(pa.array(down_type[idx]), pa.array(types)),
            "down_index": pa.array(down_index[idx]), "down_pos": pa.nulls(n, pa.int32()),
            "down_input": pa.DictionaryArray.from_arrays(
                pa.array(np.where(inp < 0, 0, inp).astype(np.int8), mask=inp < 0), pa.array(inputs)),
            "value": pa.array(value)})
        ids = np.arange(first, min(first + step, n_prompts), dtype=np.int32)
        prompts = pa.table({"run_id": pa.array(np.full(len(ids), 2, np.int32)), "prompt_id": pa.array(ids),
                            "text": pa.array([f"synthetic prompt {i}" for i in ids]),
                            "n_tokens": pa.array(np.full(len(ids), N_TOK, np.int32)),
                            "metric": pa.array(rng.standard_normal(len(ids)))})
        tokens = pa.table({"run_id": pa.array(np.full(len(ids) * N_TOK, 2, np.int32)),
                           "prompt_id": pa.array(np.repeat(ids, N_TOK)),
                           "position": pa.array(np.tile(np.arange(N_TOK, dtype=np.int32), len(ids))),
                           "token_id": pa.array(np.tile(np.arange(N_TOK, dtype=np.int32), len(ids))),
                           "token": pa.array([f"t{i}" for i in range(N_TOK)] * len(ids))})
        con.execute("BEGIN")
        for name, table in (("edges", edges), ("prompts", prompts), ("tokens", tokens)):
            con.register("batch_rows", table)
            con.execute(f"INSERT INTO {name} BY NAME SELECT * FROM batch_rows")  # table names are ours
            con.unregister("batch_rows")
        con.execute("COMMIT")
    con.execute("UPDATE runs SET status = 'complete' WHERE run_id = 2")
    con.execute("CHECKPOINT")
    total = con.execute("SELECT count(*) FROM edges WHERE run_id = 2").fetchone()[0]
    con.close()
    print(json.dumps({"built_edges": total, "seconds": round(time.perf_counter() - t0, 1),
                      "candidates_per_prompt": n_cand}), flush=True)
    return n_prompts, total


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--edges", type=int, default=10_000_000)
    ap.add_argument("--per-prompt", type=int, default=10_000)
    ap.add_argument("--pages", type=int, default=7, help="prompts opened per run")
    ap.add_argument("--db", default=None, help="reuse a file built by an earlier run")
    args = ap.parse_args()
    from playwright.sync_api import sync_playwright

    from actwh.views.server import make_server, url_of
    from actwh.warehouse import Warehouse

    db = Path(args.db) if args.db else Path(tempfile.mkdtemp()) / "views10m.duckdb"
    if not db.exists():
        build(db, args.edges, args.per_prompt)
    with Warehouse(db) as wh:
        n_prompts = wh.sql("SELECT n_prompts FROM runs WHERE run_id = 2")["n_prompts"][0]
        n_edges = wh.sql("SELECT count(*) AS n FROM edges")["n"][0]
        n_base = wh.sql("SELECT n_prompts FROM runs WHERE run_id = 1")["n_prompts"][0]
    srv = make_server(db, port=0)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    url = url_of(srv)
    rng = np.random.default_rng(1)
    out = {}
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path="/usr/bin/chromium", args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1400, "height": 900})
        for run, n in ((1, n_base), (2, n_prompts)):
            drawn, painted, sizes = [], [], []
            prompts = [int(x) for x in rng.choice(n, min(args.pages, n) + 1, replace=False)]
            for i, prompt in enumerate(prompts):
                page.goto(f"{url}circuit?run={run}&prompt={prompt}")
                page.wait_for_function("performance.getEntriesByName('circuit-painted').length > 0")
                marks = page.evaluate("['circuit-drawn', 'circuit-painted'].map("
                                      "n => performance.getEntriesByName(n)[0].startTime)")
                counts = page.evaluate("[document.querySelectorAll('#circuit g.node').length, "
                                       "document.querySelectorAll('#circuit path.edge').length]")
                if i == 0:
                    out[(run, "cold")] = marks[1]
                    continue  # the first page also loads the saved queries and warms caches
                drawn.append(marks[0])
                painted.append(marks[1])
                sizes.append(counts)
            out[run] = (statistics.median(drawn), statistics.median(painted), sizes)
        browser.close()
    srv.shutdown()
    base = out[1][1]
    drawn, painted, sizes = out[2]
    emit("circuit_page_first_drawing_median", painted, "ms", baseline="same page, real 24-prompt run "
         "(top-k:50 edges per prompt) in the same warehouse", baseline_value=base,
         model="synthetic GPT-2-small shape", edges_in_warehouse=int(n_edges),
         edges_per_prompt=args.per_prompt, dom_ready_ms=round(drawn, 1),
         cold_first_page_ms=round(out[(2, "cold")], 1),
         circuit_nodes=[s[0] for s in sizes], circuit_edges=[s[1] for s in sizes])


if __name__ == "__main__":
    main()
