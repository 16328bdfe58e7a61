"""Loading: actwh's write path (Arrow batch, one transaction, read-back) for N million
node_scalars rows vs DuckDB's raw Arrow insert of the same rows into the same schema; bytes on
disk per row.

    python benchmarks/bench_loading.py [--rows 10_000_000] [--batch-rows 1_000_000]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import duckdb
import numpy as np
import pyarrow as pa

from common import emit


def synthetic(n: int, run_id: int, first_prompt: int, rng) -> pa.Table:
    """node_scalars-shaped rows, sorted by prompt like populate writes them."""
    from actwh.compute.scalars import NODE_TYPES, SCALARS

    per_prompt = 2000
    prompt = first_prompt + np.arange(n) // per_prompt
    return pa.table({
        "run_id": pa.array(np.full(n, run_id, np.int32)),
        "prompt_id": pa.array(prompt.astype(np.int32)),
        "position": pa.array(rng.integers(0, 128, n, dtype=np.int32)),
        "layer": pa.array(rng.integers(0, 12, n, dtype=np.int16)),
        "node_type": pa.DictionaryArray.from_arrays(pa.array(np.full(n, 3, np.int8)), pa.array(NODE_TYPES)),
        "node_index": pa.array(rng.integers(0, 3072, n, dtype=np.int32)),
        "scalar": pa.DictionaryArray.from_arrays(pa.array(rng.integers(0, 3, n, dtype=np.int8)),
                                                 pa.array(tuple(SCALARS))),
        "value": pa.array(rng.standard_normal(n, dtype=np.float32)),
    })


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=10_000_000)
    ap.add_argument("--batch-rows", type=int, default=1_000_000)
    args = ap.parse_args()
    from actwh.compute.scalars import NODE_TYPES, SCALARS
    from actwh.warehouse import WarehouseWriter

    rng = np.random.default_rng(0)
    batches = [synthetic(args.batch_rows, 1, i * args.batch_rows // 2000, rng)
               for i in range(args.rows // args.batch_rows)]
    tmp = Path(tempfile.mkdtemp())
    prompts = pa.table({"run_id": pa.array([], pa.int32()), "prompt_id": pa.array([], pa.int32()),
                        "text": pa.array([], pa.string()), "n_tokens": pa.array([], pa.int32())})

    ours = WarehouseWriter(tmp / "actwh.duckdb", NODE_TYPES, tuple(SCALARS))
    t0 = time.perf_counter()
    for b in batches:
        ours.append_batch(1, {"prompts": prompts, "node_scalars": b})
    with ours.connection() as con:
        con.execute("CHECKPOINT")
    t_ours = time.perf_counter() - t0

    # Baseline: the same schema (copied from a fresh actwh file), one open connection, a plain
    # INSERT ... SELECT per batch, no transaction bookkeeping.
    WarehouseWriter(tmp / "raw.duckdb", NODE_TYPES, tuple(SCALARS))
    con = duckdb.connect(str(tmp / "raw.duckdb"))
    t0 = time.perf_counter()
    for b in batches:
        con.register("batch_rows", b)
        con.execute("INSERT INTO node_scalars BY NAME SELECT * FROM batch_rows")
        con.unregister("batch_rows")
    con.execute("CHECKPOINT")
    t_raw = time.perf_counter() - t0
    con.close()
    n = len(batches) * args.batch_rows
    emit("write_rows_per_s", n / t_ours, "rows/s", "duckdb_raw_arrow_insert_rows_per_s", n / t_raw,
         model="synthetic", batch=args.batch_rows)
    size = os.path.getsize(tmp / "actwh.duckdb")
    emit("bytes_per_node_row", size / n, "bytes/row", "duckdb_raw_bytes_per_row",
         os.path.getsize(tmp / "raw.duckdb") / n, model="synthetic", batch=args.batch_rows)


if __name__ == "__main__":
    main()
