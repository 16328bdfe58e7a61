"""Query latency on a big warehouse: median latency of top-k nodes for one prompt and of the
run-wide top nodes query, over ≥ 100 million synthetic node_scalars rows.

    python benchmarks/bench_queries.py [--rows 100_000_000]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from common import emit


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=100_000_000)
    ap.add_argument("--db", default=None, help="reuse a file built by an earlier run")
    args = ap.parse_args()
    import numpy as np

    from bench_loading import synthetic

    from actwh.compute.scalars import NODE_TYPES, SCALARS
    from actwh.queries.loader import Queries
    from actwh.warehouse import Warehouse, WarehouseWriter

    db = Path(args.db) if args.db else Path(tempfile.mkdtemp()) / "big.duckdb"
    if not db.exists():
        w = WarehouseWriter(db, NODE_TYPES, tuple(SCALARS))
        import pyarrow as pa

        empty = pa.table({"run_id": pa.array([], pa.int32()), "prompt_id": pa.array([], pa.int32()),
                          "text": pa.array([], pa.string()), "n_tokens": pa.array([], pa.int32())})
        rng = np.random.default_rng(0)
        step = 5_000_000
        for i in range(args.rows // step):
            w.append_batch(1, {"prompts": empty, "node_scalars": synthetic(step, 1, i * step // 2000, rng)})
    q = Queries()
    n_prompts = args.rows // 2000
    with Warehouse(db) as wh:
        wh.relation("SELECT 1")  # hold one read-only connection, as a notebook would
        rng = np.random.default_rng(1)
        times = []
        for _ in range(20):
            p = int(rng.integers(0, n_prompts))
            t0 = time.perf_counter()
            q["top_nodes"](wh, run=1, prompt=p, scalar="mlp_act_times_grad", k=20)
            times.append(time.perf_counter() - t0)
        emit("top_nodes_one_prompt_median", statistics.median(times) * 1000, "ms",
             model="synthetic", rows=args.rows)
        times = []
        for _ in range(3):
            t0 = time.perf_counter()
            q["run_top_nodes"](wh, run=1, scalar="mlp_act_times_grad", k=20)
            times.append(time.perf_counter() - t0)
        emit("run_top_nodes_median", statistics.median(times) * 1000, "ms", model="synthetic",
             rows=args.rows)


if __name__ == "__main__":
    main()
