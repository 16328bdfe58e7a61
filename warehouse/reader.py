"""Reading a warehouse: `Warehouse(path).sql(query, **params) -> polars.DataFrame`.

Every connection is read-only and cannot touch other files (`connection.READER_CONFIG`); the
package's views are recreated on it. Polars is imported only when a result is turned into a
DataFrame.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path

import duckdb

from actwh.errors import WarehouseError
from actwh.warehouse.connection import (check_params, check_version, connect, interruptible,
                                        one_line)
from actwh.warehouse.migrate import ENUM_VALUES_SQL

EXPORT_SQL = {
    "runs": "SELECT * FROM runs WHERE run_id = $run",
    "models": "SELECT * FROM models WHERE model_id IN (SELECT model_id FROM runs WHERE run_id = $run)",
    "prompts": "SELECT * FROM prompts WHERE run_id = $run ORDER BY prompt_id",
    "tokens": "SELECT * FROM tokens WHERE run_id = $run ORDER BY prompt_id, position",
    "node_scalars": "SELECT * FROM node_scalars WHERE run_id = $run",
    "pair_scalars": "SELECT * FROM pair_scalars WHERE run_id = $run",
    "edges": "SELECT * FROM edges WHERE run_id = $run",
}


class Warehouse:
    """Read access: `Warehouse(path).sql(query, **params) -> polars.DataFrame`."""

    def __init__(self, path, wait_s: float = 10.0):
        """`path`: a DuckDB file, `lake:PATH` or `parquet:DIR` (see `actwh.warehouse.spec`);
        all three show the same tables and views."""
        from actwh.warehouse.spec import parse_spec

        self.spec = parse_spec(path)
        self.path = self.spec.path if self.spec.kind == "file" else self.spec
        if self.spec.kind == "file":
            if not self.path.exists():
                raise WarehouseError(f"no warehouse at {self.path}")
            if not self.path.is_file():
                raise WarehouseError(f"{self.path} is not a warehouse file")
        elif not self.spec.exists():
            raise WarehouseError(f"no warehouse at {self.spec}")
        self.wait_s = wait_s
        self._con: duckdb.DuckDBPyConnection | None = None
        with self.connection() as con:
            check_version(con, self.path)

    def _connect(self) -> duckdb.DuckDBPyConnection:
        if self.spec.kind == "file":
            return connect(self.path, read_only=True, wait_s=self.wait_s)
        from actwh.warehouse.sources import reader_connection

        return reader_connection(self.spec, self.wait_s)

    @contextmanager
    def connection(self):
        """A read-only connection for one call (or the long-lived one a relation uses)."""
        if self._con is not None:
            yield self._con
            return
        con = self._connect()
        try:
            yield con
        finally:
            con.close()

    def _fetch(self, query: str, params: dict, materialise):
        check_params(query, params)
        with self.connection() as con, interruptible(con):
            try:
                rel = con.sql(query, params=params or None)
                if rel is None:
                    raise WarehouseError("the statement returns no rows to show; give one SELECT "
                                         "(or another statement that returns a result)")
                return materialise(rel)
            except duckdb.InterruptException:
                raise KeyboardInterrupt from None
            except duckdb.Error as e:
                raise WarehouseError(one_line(e, self.path)) from None

    def sql(self, query: str, **params):
        """Run one statement with bound `$name` parameters; the result as a Polars DataFrame."""
        return self._fetch(query, params, lambda rel: rel.pl())

    def arrow(self, query: str, **params):
        """The same, as an Arrow table."""
        return self._fetch(query, params, lambda rel: rel.fetch_arrow_table())

    def relation(self, query: str, **params) -> duckdb.DuckDBPyRelation:
        """A lazy DuckDB relation; holds a read-only connection until `close()`."""
        check_params(query, params)
        if self._con is None:
            self._con = self._connect()
        try:
            return self._con.sql(query, params=params or None)
        except duckdb.Error as e:
            raise WarehouseError(one_line(e)) from None

    def runs(self):
        return self.sql("SELECT * FROM runs ORDER BY run_id")

    def models(self):
        return self.sql("SELECT model_id, name, arch, n_layers, n_heads, d_model, d_mlp, d_vocab, "
                        "n_ctx, weights_sha256, source FROM models ORDER BY model_id")

    def run_ids(self) -> list[int]:
        return self.sql("SELECT run_id FROM runs ORDER BY run_id")["run_id"].to_list()

    def require_run(self, run_id: int) -> None:
        """Refuse a run id that is not in the file, naming the ones that are."""
        ids = self.run_ids()
        if run_id not in ids:
            raise WarehouseError(f"no run {run_id} in {self.path}; runs: "
                                 f"{', '.join(map(str, ids)) or 'none'}")

    def check_values(self, params: dict) -> None:
        """Refuse parameter values that match nothing in the file, naming the valid ones:
        runs (`run`, `run_a`, `run_b`, `other_run`), `prompt` of a run, `scalar`, `node_type`."""
        runs = self.run_ids()
        for key in ("run", "run_a", "run_b", "other_run"):
            if params.get(key) is not None and params[key] not in runs:
                raise WarehouseError(f"{key}={params[key]!r} matches no run; runs: "
                                     f"{', '.join(map(str, runs)) or 'none'}")
        for key in ("scalar", "node_type"):
            if params.get(key) is not None:
                with self.connection() as con:
                    valid = [r[0] for r in con.execute(ENUM_VALUES_SQL[key]).fetchall()]
                if params[key] not in valid:
                    raise WarehouseError(f"{key}={params[key]!r} is not a {key}; valid: "
                                         f"{', '.join(valid)}")
        if params.get("prompt") is not None and params.get("run") in runs:
            n = self.sql("SELECT count(*) AS n FROM prompts WHERE run_id = $run AND prompt_id = $p",
                         run=params["run"], p=params["prompt"])["n"][0]
            if n == 0:
                span = self.sql("SELECT min(prompt_id) AS lo, max(prompt_id) AS hi FROM prompts "
                                "WHERE run_id = $run", run=params["run"]).row(0, named=True)
                raise WarehouseError(f"prompt={params['prompt']!r} is not in run {params['run']}; "
                                     f"its prompts: {span['lo']}..{span['hi']}")

    def export_run(self, run_id: int, folder: str | os.PathLike) -> list[Path]:
        """One Parquet file per table; each written under a temporary name, then renamed.

        The only code path that writes files from a reader: the connection itself cannot."""
        import pyarrow.parquet as pq

        folder = Path(folder)
        self.require_run(run_id)
        try:
            folder.mkdir(parents=True, exist_ok=True)
            if not os.access(folder, os.W_OK | os.X_OK):
                raise PermissionError(13, "Permission denied", str(folder))
        except OSError as e:
            raise WarehouseError(f"cannot write to {folder}: {e.strerror}") from None
        written = []
        with self.connection() as con:
            for table, query in EXPORT_SQL.items():
                final = folder / f"{table}.parquet"
                tmp = folder / f".{table}.parquet.tmp"
                reader = con.sql(query, params={"run": run_id}).to_arrow_reader()
                try:
                    with pq.ParquetWriter(tmp, reader.schema, compression="zstd") as w:
                        for rb in reader:
                            w.write_batch(rb)
                    os.replace(tmp, final)
                except OSError as e:
                    tmp.unlink(missing_ok=True)
                    raise WarehouseError(f"cannot write {final}: {e.strerror or e}") from None
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


