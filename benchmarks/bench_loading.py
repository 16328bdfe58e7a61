"""Loading: actwh's write path (Arrow batch, one transaction, read-back) for N million
node_scalars rows vs DuckDB's raw Arrow insert of the same rows into the same schema; bytes on
disk per row, and what each column costs.

Three kinds of rows:
- `real-dense`: what `actwh populate --select dense` writes on the default model (the shipped
  IOI prompts), repeated with fresh prompt ids up to N rows;
- `real-topk`: what the default `--select top-k:20:mlp_act_times_grad` writes on every shipped
  prompt, repeated likewise;
- `synthetic-random`: random positions, layers, node indices, scalars and values (a worst case
  for the keys; what session 1 measured).

    python benchmarks/bench_loading.py [--rows 10_000_000] [--batch-rows 1_000_000]
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

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


def populated_rows(tmp: Path, select: str, prompt_kinds: tuple[str, ...]) -> pa.Table:
    """node_scalars exactly as a real `actwh populate` on the default model wrote them."""
    from actwh.compute.default_model import default_prompts

    prompts = tmp / f"prompts-{select.replace(':', '_')}.jsonl"
    prompts.write_text("".join(default_prompts(k).read_text() for k in prompt_kinds))
    db = tmp / f"populated-{select.replace(':', '_')}.duckdb"
    subprocess.run([sys.executable, "-m", "actwh.cli", "populate", str(prompts), "--db", str(db),
                    "--select", select, "--top", "0"], check=True, capture_output=True)
    con = duckdb.connect(str(db), read_only=True)
    # the file's own row order is the write order, batch by batch
    rows = con.execute("SELECT * FROM node_scalars").to_arrow_table()
    con.close()
    return rows


def repeated(rows: pa.Table, n: int, batch_rows: int) -> list[pa.Table]:
    """`rows` repeated with fresh prompt ids until n rows, cut into batches at prompt bounds."""
    from actwh.compute.scalars import NODE_TYPES, SCALARS

    # Arrow dictionaries in the writer's enum order, as the runner builds them
    rows = rows.set_column(4, "node_type", pa.DictionaryArray.from_arrays(
        pa.array([NODE_TYPES.index(v) for v in rows["node_type"].to_pylist()], pa.int8()),
        pa.array(NODE_TYPES)))
    rows = rows.set_column(6, "scalar", pa.DictionaryArray.from_arrays(
        pa.array([tuple(SCALARS).index(v) for v in rows["scalar"].to_pylist()], pa.int8()),
        pa.array(tuple(SCALARS))))
    span = pc.max(rows["prompt_id"]).as_py() + 1
    per_batch = max(1, batch_rows // rows.num_rows)
    copies = max(1, round(n / rows.num_rows))
    batches, copy = [], 0
    while copy < copies:
        k = min(per_batch, copies - copy)
        batches.append(pa.concat_tables(
            rows.set_column(1, "prompt_id", pc.add(rows["prompt_id"], pa.scalar((copy + i) * span, pa.int32())))
            for i in range(k)))
        copy += k
    return batches


def empty_prompts() -> pa.Table:
    return pa.table({"run_id": pa.array([], pa.int32()), "prompt_id": pa.array([], pa.int32()),
                     "text": pa.array([], pa.string()), "n_tokens": pa.array([], pa.int32())})


def write_both(tmp: Path, tag: str, batches: list[pa.Table]) -> dict[str, float]:
    from actwh.compute.scalars import NODE_TYPES, SCALARS
    from actwh.warehouse import WarehouseWriter

    ours = WarehouseWriter(tmp / f"{tag}-actwh.duckdb", NODE_TYPES, tuple(SCALARS))
    t0 = time.perf_counter()
    for b in batches:
        ours.append_batch(1, {"prompts": empty_prompts(), "node_scalars": b})
    with ours.connection() as con:
        con.execute("CHECKPOINT")
    t_ours = time.perf_counter() - t0

    # Baseline: the same schema (copied from a fresh actwh file), one open connection, a plain
    # INSERT ... SELECT per batch, no transaction bookkeeping.
    WarehouseWriter(tmp / f"{tag}-raw.duckdb", NODE_TYPES, tuple(SCALARS))
    con = duckdb.connect(str(tmp / f"{tag}-raw.duckdb"))
    t0 = time.perf_counter()
    for b in batches:
        con.register("batch_rows", b)
        con.execute("INSERT INTO node_scalars BY NAME SELECT * FROM batch_rows")
        con.unregister("batch_rows")
    con.execute("CHECKPOINT")
    t_raw = time.perf_counter() - t0
    con.close()
    empty = tmp / f"{tag}-empty.duckdb"
    WarehouseWriter(empty, NODE_TYPES, tuple(SCALARS))
    base = os.path.getsize(empty)  # the schema, views and catalogue of an empty warehouse
    return dict(t_ours=t_ours, t_raw=t_raw,
                bytes_ours=os.path.getsize(tmp / f"{tag}-actwh.duckdb") - base,
                bytes_raw=os.path.getsize(tmp / f"{tag}-raw.duckdb") - base)


def column_bytes(tmp: Path, batches: list[pa.Table]) -> dict[str, float]:
    """Bytes each column takes on its own: a one-column table with the warehouse's own column
    type (the ENUMs included), the same rows in the same order, in a copy of an empty warehouse."""
    from actwh.compute.scalars import NODE_TYPES, SCALARS
    from actwh.warehouse import WarehouseWriter

    empty = tmp / "columns-empty.duckdb"
    WarehouseWriter(empty, NODE_TYPES, tuple(SCALARS))
    rows = pa.concat_tables(batches)
    out = {}
    for col in rows.column_names:
        path = tmp / f"column-{col}.duckdb"
        shutil.copy(empty, path)
        con = duckdb.connect(str(path))
        # col is an identifier from node_scalars' own column list (identifiers cannot be bound)
        con.execute(f'CREATE TABLE one_column AS SELECT "{col}" FROM node_scalars WHERE false')
        con.register("rows", rows.select([col]))
        con.execute("INSERT INTO one_column SELECT * FROM rows")
        con.execute("CHECKPOINT")
        con.close()
        out[col] = (os.path.getsize(path) - os.path.getsize(empty)) / rows.num_rows
        path.unlink()
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=10_000_000)
    ap.add_argument("--batch-rows", type=int, default=1_000_000)
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp())

    rng = np.random.default_rng(0)
    kinds = {
        "real-dense": repeated(populated_rows(tmp, "dense", ("ioi",)), args.rows, args.batch_rows),
        "real-topk": repeated(populated_rows(tmp, "top-k:20:mlp_act_times_grad",
                                             ("ioi", "induction", "successor")),
                              args.rows, args.batch_rows),
        "synthetic-random": [synthetic(args.batch_rows, 1, i * args.batch_rows // 2000, rng)
                             for i in range(args.rows // args.batch_rows)],
    }
    for kind, batches in kinds.items():
        n = sum(b.num_rows for b in batches)
        got = write_both(tmp, kind, batches)
        emit("write_rows_per_s", n / got["t_ours"], "rows/s", "duckdb_raw_arrow_insert_rows_per_s",
             n / got["t_raw"], model=kind, batch=args.batch_rows, rows=n)
        emit("bytes_per_node_row", got["bytes_ours"] / n, "bytes/row", "duckdb_raw_bytes_per_row",
             got["bytes_raw"] / n, model=kind, batch=args.batch_rows, rows=n)
        if kind.startswith("real"):
            per_col = column_bytes(tmp, batches)
            emit("value_column_bytes_per_row", per_col["value"], "bytes/row", model=kind, rows=n,
                 columns={k: round(v, 3) for k, v in per_col.items()})
        for f in tmp.glob(f"{kind}-*.duckdb"):
            f.unlink()


if __name__ == "__main__":
    main()
