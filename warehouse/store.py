"""The Warehouse: a DuckDB file, opened read-only by readers and briefly read-write by writers.

DuckDB lets one process write or many read, never both, so nobody holds the file for long: a
populate opens it only to write one batch, and readers open it read-only per query (or for as
long as a lazy relation lives) and retry briefly when a writer holds it.

Durability (measured on DuckDB here): after an error inside a transaction a later COMMIT can
return normally and roll everything back, and several statements sent as one string are not
atomic. So each batch is one explicit BEGIN ... COMMIT of single statements, and its `batches`
row is read back afterwards; if it is missing the write failed, loudly.
"""

from __future__ import annotations

import json
import logging
import os
import re
import time
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path

import duckdb
import pyarrow as pa

from actwh.errors import WarehouseError
from actwh.warehouse.schema import BIG_TABLES, SCHEMA_VERSION, build_metadata

log = logging.getLogger("actwh.warehouse")
VIEWS_SQL = Path(__file__).with_name("views.sql")
LOCK_RE = re.compile(r"Conflicting lock is held in (.*?)(?: \(PID (\d+)\))?(?:\.|$| by)")
# One static statement per table; columns matched by name, values come from the registered Arrow.
INSERT_SQL = {
    "prompts": "INSERT INTO prompts BY NAME SELECT * FROM batch_rows",
    "tokens": "INSERT INTO tokens BY NAME SELECT * FROM batch_rows",
    "node_scalars": "INSERT INTO node_scalars BY NAME SELECT * FROM batch_rows",
    "pair_scalars": "INSERT INTO pair_scalars BY NAME SELECT * FROM batch_rows",
    "edges": "INSERT INTO edges BY NAME SELECT * FROM batch_rows",
}
EXPORT_SQL = {
    "runs": "SELECT * FROM runs WHERE run_id = $run",
    "models": "SELECT * FROM models WHERE model_id IN (SELECT model_id FROM runs WHERE run_id = $run)",
    "prompts": "SELECT * FROM prompts WHERE run_id = $run ORDER BY prompt_id",
    "tokens": "SELECT * FROM tokens WHERE run_id = $run ORDER BY prompt_id, position",
    "node_scalars": "SELECT * FROM node_scalars WHERE run_id = $run",
    "pair_scalars": "SELECT * FROM pair_scalars WHERE run_id = $run",
    "edges": "SELECT * FROM edges WHERE run_id = $run",
}


def _now() -> datetime:
    return datetime.now(timezone.utc).replace(tzinfo=None)


def _is_lock_error(e: Exception) -> bool:
    return "lock" in str(e).lower()


def connect(path: str | os.PathLike, read_only: bool, wait_s: float = 10.0,
            on_wait=None) -> duckdb.DuckDBPyConnection:
    """Open the file, retrying while another process holds a conflicting lock."""
    deadline = time.monotonic() + wait_s
    delay, told = 0.02, False
    while True:
        try:
            return duckdb.connect(str(path), read_only=read_only)
        except duckdb.Error as e:
            if not _is_lock_error(e):
                raise WarehouseError(f"cannot open {path}: {str(e).splitlines()[0]}") from None
            m = LOCK_RE.search(str(e))
            holder = f"process {m.group(2)}" if m and m.group(2) else "another process"
            if time.monotonic() >= deadline:
                raise WarehouseError(f"{path} is locked by {holder}; "
                                     f"gave up after {wait_s:.0f}s") from None
            if on_wait is not None and not told:
                on_wait(f"waiting for {holder}, which holds {path}")
                told = True
            time.sleep(delay)
            delay = min(delay * 2, 0.1)


class Warehouse:
    """Read access: `Warehouse(path).sql(query, **params) -> polars.DataFrame`."""

    def __init__(self, path: str | os.PathLike, wait_s: float = 10.0):
        self.path = Path(path)
        if not self.path.exists():
            raise WarehouseError(f"no warehouse at {self.path}")
        self.wait_s = wait_s
        self._con: duckdb.DuckDBPyConnection | None = None
        with self.connection() as con:
            check_version(con, self.path)

    @contextmanager
    def connection(self):
        """A read-only connection for one call (or the long-lived one a relation uses)."""
        if self._con is not None:
            yield self._con
            return
        con = connect(self.path, read_only=True, wait_s=self.wait_s)
        try:
            yield con
        finally:
            con.close()

    def _fetch(self, query: str, params: dict, materialise):
        with self.connection() as con:
            try:
                return materialise(con.sql(query, params=params or None))
            except duckdb.Error as e:
                raise WarehouseError(str(e).splitlines()[0]) from None

    def sql(self, query: str, **params):
        """Run one statement with bound `$name` parameters; the result as a Polars DataFrame."""
        return self._fetch(query, params, lambda rel: rel.pl())

    def arrow(self, query: str, **params) -> pa.Table:
        """The same, as an Arrow table."""
        return self._fetch(query, params, lambda rel: rel.fetch_arrow_table())

    def relation(self, query: str, **params) -> duckdb.DuckDBPyRelation:
        """A lazy DuckDB relation; holds a read-only connection until `close()`."""
        if self._con is None:
            self._con = connect(self.path, read_only=True, wait_s=self.wait_s)
        return self._con.sql(query, params=params or None)

    def runs(self):
        return self.sql("SELECT * FROM runs ORDER BY run_id")

    def models(self):
        return self.sql("SELECT model_id, name, arch, n_layers, n_heads, d_model, d_mlp, d_vocab, "
                        "n_ctx, weights_sha256, source FROM models ORDER BY model_id")

    def export_run(self, run_id: int, folder: str | os.PathLike) -> list[Path]:
        """One Parquet file per table; each written under a temporary name, then renamed."""
        import pyarrow.parquet as pq

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        if self.sql("SELECT count(*) AS n FROM runs WHERE run_id = $run", run=run_id)["n"][0] == 0:
            raise WarehouseError(f"no run {run_id} in {self.path}")
        written = []
        with self.connection() as con:
            for table, query in EXPORT_SQL.items():
                final = folder / f"{table}.parquet"
                tmp = folder / f".{table}.parquet.tmp"
                reader = con.sql(query, params={"run": run_id}).to_arrow_reader()
                with pq.ParquetWriter(tmp, reader.schema, compression="zstd") as w:
                    for rb in reader:
                        w.write_batch(rb)
                os.replace(tmp, final)
                written.append(final)
        return written

    def close(self) -> None:
        if self._con is not None:
            self._con.close()
            self._con = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def check_version(con, path) -> None:
    try:
        row = con.execute("SELECT value FROM actwh_meta WHERE key = 'schema_version'").fetchone()
    except duckdb.CatalogException:
        raise WarehouseError(f"{path} is not an actwh warehouse (no actwh_meta table)") from None
    if row is None or int(row[0]) != SCHEMA_VERSION:
        found = row[0] if row else "none"
        raise WarehouseError(f"{path} has schema version {found}; this actwh reads version "
                             f"{SCHEMA_VERSION}")


class WarehouseWriter:
    """Write access, one short transaction at a time; creates the file and schema if needed."""

    def __init__(self, path: str | os.PathLike, node_types, scalars, wait_s: float = 60.0,
                 on_wait=None, checkpoint_every: int = 8):
        self.path = Path(path)
        self.wait_s, self.on_wait = wait_s, on_wait
        self.checkpoint_every = checkpoint_every
        self._batches_since_checkpoint = 0
        self.scalars = tuple(scalars)
        if not self.path.exists():
            self._create(tuple(node_types), self.scalars)
        with self.connection() as con:
            check_version(con, self.path)
            known = {r[0] for r in con.execute(
                "SELECT unnest(enum_range(NULL::scalar))").fetchall()}
        if set(self.scalars) - known:
            raise WarehouseError(f"{self.path} was made by an actwh that lacks scalars "
                                 f"{sorted(set(self.scalars) - known)}")

    def _create(self, node_types, scalars) -> None:
        import sqlalchemy as sa

        tmp = self.path.with_name(self.path.name + ".creating")
        tmp.unlink(missing_ok=True)
        engine = sa.create_engine(f"duckdb:///{tmp}")
        try:
            md = build_metadata(node_types, scalars)
            md.create_all(engine)
            with engine.begin() as c:
                c.execute(md.tables["actwh_meta"].insert(),
                          [{"key": "schema_version", "value": str(SCHEMA_VERSION)}])
                for statement in VIEWS_SQL.read_text().split(";\n"):
                    if statement.strip():
                        c.exec_driver_sql(statement)
        finally:
            engine.dispose()
        os.replace(tmp, self.path)  # a half-created file is never seen under the real name

    @contextmanager
    def connection(self):
        con = connect(self.path, read_only=False, wait_s=self.wait_s, on_wait=self.on_wait)
        try:
            yield con
        finally:
            con.close()

    @contextmanager
    def transaction(self):
        with self.connection() as con:
            con.execute("BEGIN TRANSACTION")
            try:
                yield con
            except BaseException:
                con.execute("ROLLBACK")
                raise
            con.execute("COMMIT")

    def register_model(self, info: dict) -> int:
        """The model's id, adding a row the first time these weights are seen."""
        with self.transaction() as con:
            row = con.execute("SELECT model_id FROM models WHERE weights_sha256 = $sha "
                              "AND source = $source",
                              {"sha": info["weights_sha256"], "source": info["source"]}).fetchone()
            if row:
                return row[0]
            model_id = con.execute("SELECT coalesce(max(model_id), 0) + 1 FROM models").fetchone()[0]
            con.execute("INSERT INTO models VALUES ($id, $name, $source, $weights_sha256, $arch, "
                        "$n_layers, $n_heads, $d_model, $d_head, $d_mlp, $d_vocab, $n_ctx, $config)",
                        {**info, "id": model_id, "config": json.dumps(info["config"])})
            return model_id

    def register_sae(self, model_id: int, info: dict) -> int:
        """The autoencoder's id, adding a row the first time these weights are seen at this site."""
        with self.transaction() as con:
            row = con.execute("SELECT sae_id FROM saes WHERE weights_sha256 = $sha AND site = $site "
                              "AND model_id = $model",
                              {"sha": info["weights_sha256"], "site": info["site"],
                               "model": model_id}).fetchone()
            if row:
                return row[0]
            sae_id = con.execute("SELECT coalesce(max(sae_id), 0) + 1 FROM saes").fetchone()[0]
            con.execute("INSERT INTO saes VALUES ($id, $model, $site, $d_in, $d_sae, $source, "
                        "$weights_sha256, $config)",
                        {**info, "id": sae_id, "model": model_id, "config": json.dumps(info["config"])})
            return sae_id

    def create_run(self, model_id: int, **run) -> int:
        with self.transaction() as con:
            run_id = con.execute("SELECT coalesce(max(run_id), 0) + 1 FROM runs").fetchone()[0]
            con.execute("INSERT INTO runs VALUES ($run_id, $model_id, $name, $created_at, NULL, "
                        "'running', $target, $scalars, $selection, $code_version, $device, $dtype, "
                        "$n_prompts, $options)",
                        {**run, "run_id": run_id, "model_id": model_id, "created_at": _now(),
                         "options": json.dumps(run["options"])})
        return run_id

    def run(self, run_id: int) -> dict:
        with self.connection() as con:
            cur = con.execute("SELECT * FROM runs WHERE run_id = $run", {"run": run_id})
            row = cur.fetchone()
            if row is None:
                raise WarehouseError(f"no run {run_id} in {self.path}")
            cols = [d[0] for d in cur.description]
        out = dict(zip(cols, row))
        out["options"] = json.loads(out["options"])
        return out

    def done_prompts(self, run_id: int) -> set[int]:
        with self.connection() as con:
            return {r[0] for r in con.execute("SELECT prompt_id FROM prompts WHERE run_id = $run",
                                              {"run": run_id}).fetchall()}

    def append_batch(self, run_id: int, tables: dict[str, pa.Table]) -> int:
        """Write one batch (prompts, tokens, node_scalars, pair_scalars, edges) atomically.

        One INSERT ... SELECT from Arrow per table, in one transaction, then the batch's
        bookkeeping row is read back: a silently rolled-back COMMIT cannot pass for a write.
        """
        counts = {t: tables[t].num_rows if t in tables else 0 for t in BIG_TABLES}
        with self.connection() as con:
            batch_id = con.execute("SELECT coalesce(max(batch_id), 0) + 1 FROM batches "
                                   "WHERE run_id = $run", {"run": run_id}).fetchone()[0]
            con.execute("BEGIN TRANSACTION")
            try:
                for table in ("prompts", "tokens", *BIG_TABLES):
                    if table in tables and tables[table].num_rows:
                        con.register("batch_rows", tables[table])
                        con.execute(INSERT_SQL[table])
                        con.unregister("batch_rows")
                con.execute("INSERT INTO batches VALUES ($run, $batch, $n, $nodes, $pairs, $edges, "
                            "$at)", {"run": run_id, "batch": batch_id,
                                     "n": tables["prompts"].num_rows, "nodes": counts["node_scalars"],
                                     "pairs": counts["pair_scalars"], "edges": counts["edges"],
                                     "at": _now()})
                con.execute("COMMIT")
            except BaseException as e:
                try:
                    con.execute("ROLLBACK")
                except duckdb.Error:
                    pass
                if isinstance(e, duckdb.Error):
                    raise WarehouseError(f"batch {batch_id} of run {run_id} was not written: "
                                         f"{str(e).splitlines()[0]}") from None
                raise
            found = con.execute("SELECT n_node_rows FROM batches WHERE run_id = $run AND "
                                "batch_id = $batch", {"run": run_id, "batch": batch_id}).fetchone()
            if found is None or found[0] != counts["node_scalars"]:
                raise WarehouseError(f"batch {batch_id} of run {run_id} did not land: the commit "
                                     "was rolled back")
            self._batches_since_checkpoint += 1
            if self._batches_since_checkpoint >= self.checkpoint_every:
                con.execute("CHECKPOINT")
                self._batches_since_checkpoint = 0
        return batch_id

    def finish_run(self, run_id: int) -> str:
        """Mark the run complete if every prompt is in; return its status."""
        with self.transaction() as con:
            n, expected = con.execute(
                "SELECT (SELECT count(*) FROM prompts WHERE run_id = $run), n_prompts FROM runs "
                "WHERE run_id = $run", {"run": run_id}).fetchone()
            status = "complete" if n == expected else "running"
            con.execute("UPDATE runs SET status = $status, finished_at = $at WHERE run_id = $run",
                        {"status": status, "at": _now() if status == "complete" else None,
                         "run": run_id})
        with self.connection() as con:
            con.execute("CHECKPOINT")
        return status
