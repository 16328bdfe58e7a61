"""A lake or a Parquet folder as DuckDB tables: what readers query and `ingest` copies.

Each table of the schema becomes a view of the same name and column types (ENUMs included) over
Arrow objects registered on the connection: the Parquet files of the big tables as a
`pyarrow.dataset` (scanned lazily, with projection and filters pushed down), the small ones read
into memory. DuckDB itself never opens a file, so a reader's connection keeps
`enable_external_access = false` as a reader of a DuckDB file does: it cannot write anywhere or
read other files.

- A Parquet folder: `actwh.json` (schema version, ENUM values), `runs/`, `models/`, `saes/`
  (one file per row), and the batches: a batch is committed by its manifest entry
  `manifest/r{run}-b{batch}.json`, which lists its files under `data/TABLE/`; files no entry
  lists (a writer killed before its commit) are never read.
- A lake: the catalog is attached read-only for one snapshot (one transaction): the small
  tables are read, the big ones' data files listed (the writers never update or delete them,
  which is checked: no delete files, row counts equal).
"""

from __future__ import annotations

import json
import threading
import time
from contextlib import contextmanager

import duckdb

from actwh.errors import WarehouseError
from actwh.warehouse import ddl
from actwh.warehouse.connection import (WarehouseLocked, _compose, _ddl, _holder, _ident,
                                        _is_lock_error, _type, one_line)
from actwh.warehouse.spec import PARQUET_META, Spec, lake_extension

FILE_TABLES = ("prompts", "tokens", "node_scalars", "pair_scalars", "edges")  # written once
ROW_FOLDERS = {"runs": "run", "models": "model", "saes": "sae"}  # Parquet folder: a file a row


def lake_connection():
    """An in-memory connection with the DuckLake extension loaded (by path, offline)."""
    con = duckdb.connect()
    try:
        con.execute("LOAD " + _quote(lake_extension()))
    except BaseException:
        con.close()
        raise
    return con


@contextmanager
def attached(con, spec: Spec, read_only: bool, wait_s: float | None = 10.0, on_wait=None):
    """The lake attached as `lake` (and in use) on `con` (a `lake_connection`) for the block,
    retrying while another process holds the catalog file (WarehouseLocked when wait_s runs
    out); detached after, so the catalog is held only as long as the block runs."""
    deadline = None if wait_s is None else time.monotonic() + wait_s
    delay, told = 0.02, False
    # ATTACH binds no parameters: the paths go in as escaped string literals. The catalog
    # stores its data folder's absolute path: given again (and overriding it), a lake folder
    # that was moved or copied reads and writes its own data.
    options = (f"DATA_PATH {_quote(str(spec.data.resolve()) + '/')}, OVERRIDE_DATA_PATH TRUE, "
               + ("READ_ONLY" if read_only else "DATA_INLINING_ROW_LIMIT 0"))
    while True:
        try:
            con.execute(_compose("ATTACH {catalog} AS lake ({options})", options=options,
                                 catalog=_quote("ducklake:" + str(spec.catalog.resolve()))))
            break
        except duckdb.Error as e:
            if not _is_lock_error(e):
                raise WarehouseError(f"cannot open {spec}: {one_line(e)}") from None
            holder = _holder(e)
            if deadline is not None and time.monotonic() >= deadline:
                raise WarehouseLocked(spec, holder) from None
            if on_wait is not None and not told:
                on_wait(f"waiting for {holder}, which holds {spec.catalog}")
                told = True
            time.sleep(delay)
            delay = min(delay * 2, 0.1)
    try:
        con.execute("USE lake")
        yield con
    finally:
        try:
            con.execute("ROLLBACK")  # whatever the block left open
        except duckdb.Error:
            pass
        con.execute("USE memory")
        con.execute("DETACH lake")


def _quote(text: str) -> str:
    """A file path as a SQL string literal (LOAD and ATTACH bind no parameters)."""
    return "'" + text.replace("'", "''") + "'"


def lake_meta(con) -> dict:
    """schema_version, node_types and scalars from a lake's actwh_meta (attached as `lake`)."""
    try:
        rows = dict(con.execute("SELECT key, value FROM lake.actwh_meta").fetchall())
    except duckdb.CatalogException:
        raise WarehouseError("the lake holds no actwh warehouse (no actwh_meta table)") from None
    return {"schema_version": rows.get("schema_version"),
            "node_types": json.loads(rows.get("node_types", "[]")),
            "scalars": json.loads(rows.get("scalars", "[]"))}


_READER = threading.local()  # one extension-loaded connection per thread, reused by readers


def lake_sources(spec: Spec, wait_s: float | None = 10.0) -> tuple[dict, dict]:
    """(meta, {table: Arrow table or list of Parquet files}) of one snapshot of the lake."""
    import pyarrow.dataset as ds

    if getattr(_READER, "con", None) is None:
        _READER.con, _READER.seen = lake_connection(), {}
    with attached(_READER.con, spec, read_only=True, wait_s=wait_s) as con:
        try:
            con.execute("BEGIN TRANSACTION")
            snapshot = con.execute("SELECT max(snapshot_id) FROM ducklake_snapshots('lake')").fetchone()[0]
            key = str(spec.catalog.resolve())
            if _READER.seen.get(key, (None,))[0] == snapshot:  # nothing committed since
                con.execute("COMMIT")
                return _READER.seen[key][1]
            meta = lake_meta(con)
            present = {r[0] for r in con.execute(
                "SELECT table_name FROM duckdb_tables() WHERE database_name = 'lake'").fetchall()}
            out: dict = {}
            for table in ddl.columns():
                if table not in present:
                    continue
                if table not in FILE_TABLES:
                    out[table] = con.execute(_ddl("SELECT * FROM lake.{t}", t=table)).to_arrow_table()
                    continue
                files = con.execute("SELECT data_file, delete_file FROM ducklake_list_files("
                                    "'lake', $t)", {"t": table}).fetchall()
                n = con.execute(_ddl("SELECT count(*) FROM lake.{t}", t=table)).fetchone()[0]
                paths = [f for f, _ in files]
                found = ds.dataset(paths, format="parquet").count_rows() if paths else 0
                if any(d is not None for _, d in files) or found != n:
                    raise WarehouseError(f"{spec}: table {table} has rows outside its data files "
                                         "(deleted or inlined rows): not an actwh-written lake")
                out[table] = paths
            con.execute("COMMIT")
        except duckdb.Error as e:
            raise WarehouseError(f"cannot read {spec}: {one_line(e)}") from None
    _READER.seen[key] = (snapshot, (meta, out))
    return meta, out


def folder_meta(spec: Spec) -> dict:
    try:
        return json.loads((spec.path / PARQUET_META).read_text())
    except FileNotFoundError:
        raise WarehouseError(f"no warehouse at {spec}") from None
    except (OSError, ValueError) as e:
        raise WarehouseError(f"{spec}: cannot read {PARQUET_META}: {e}") from None


def manifest(spec: Spec) -> list[dict]:
    """The committed batches of a Parquet folder, in (run, batch) order."""
    out = []
    for path in (spec.path / "manifest").glob("r*-b*.json"):
        try:
            out.append(json.loads(path.read_text()))
        except (OSError, ValueError) as e:
            raise WarehouseError(f"{spec}: unreadable manifest entry {path.name}: {e}") from None
    return sorted(out, key=lambda m: (m["run_id"], m["batch_id"]))


def folder_sources(spec: Spec) -> tuple[dict, dict]:
    """(meta, {table: list of Parquet files}) of a Parquet folder's committed batches."""
    meta = folder_meta(spec)
    out: dict = {t: [] for t in ddl.columns()}
    for entry in manifest(spec):
        for table, rel in entry["files"].items():
            out[table].append(str(spec.path / rel))
    for table, stem in ROW_FOLDERS.items():
        out[table] = [str(p) for p in sorted((spec.path / table).glob(f"{stem}-*.parquet"))]
    import pyarrow as pa

    out["actwh_meta"] = pa.table({"key": ["schema_version"], "value": [str(meta["schema_version"])]})
    return meta, out


def sources(spec: Spec, wait_s: float | None = 10.0) -> tuple[dict, dict]:
    meta, out = lake_sources(spec, wait_s) if spec.kind == "lake" else folder_sources(spec)
    if str(meta.get("schema_version")) != str(ddl.SCHEMA_VERSION):
        raise WarehouseError(f"{spec} has schema version {meta.get('schema_version')}; this actwh "
                             f"reads version {ddl.SCHEMA_VERSION}")
    return meta, out


def create_types(con, node_types, scalars) -> None:
    """The ENUM types, as the schema declares them, on a connection that has none."""
    for statement in ddl.statements(node_types, scalars):
        if statement.startswith("CREATE TYPE"):
            con.execute(statement)


def install_views(con, found: dict, prefix: str = "", temporary: bool = False) -> None:
    """One view per schema table (`prefix` + name) over the registered sources, cast to the
    schema's column types (a column a source lacks is NULL; a table it lacks is empty)."""
    import pyarrow.dataset as ds

    for table, cols in ddl.columns().items():
        src = found.get(table)
        if isinstance(src, list):
            src = ds.dataset(src, format="parquet") if src else None
        name = _ident(prefix + table)
        have = set(src.schema.names) if src is not None else set()
        columns = ", ".join(_compose("CAST({v} AS {k}) AS {c}", v=_ident(c) if c in have else "NULL",
                                     k=_type(kind), c=_ident(c)) for c, kind, _ in cols)
        if src is not None:
            con.register("_src_" + name, src)
        con.execute(_compose("CREATE OR REPLACE {temp}VIEW {name} AS SELECT {columns} {source}",
                             temp="TEMP " if temporary else "", name=name, columns=columns,
                             source=_ddl("FROM _src_{n}", n=name) if src is not None else "WHERE false"))


def reader_connection(spec: Spec, wait_s: float | None = 10.0):
    """An in-memory, read-only-in-effect connection over a lake or a Parquet folder: the
    schema's tables as views, the package's views on top, no access to any file."""
    from actwh.warehouse.connection import READER_CONFIG, package_views

    meta, found = sources(spec, wait_s)
    con = duckdb.connect()
    try:
        create_types(con, meta["node_types"], meta["scalars"])
        install_views(con, found)
        for key, value in READER_CONFIG.items():
            con.execute(_compose("SET {key} = {value}", key=_ident(key), value=str(bool(value)).lower()))
        package_views(con)
    except BaseException:
        con.close()
        raise
    return con
