"""The Warehouse: a DuckDB file, opened read-only by readers and briefly read-write by writers.

DuckDB lets one process write or many read, never both, so nobody holds the file for long:
readers open it read-only per query (or for as long as a lazy relation lives) and retry briefly
when a writer holds it; a populate keeps computing while someone else holds the file, holds its
finished batches (in memory up to a bound, then spilled to a staging folder beside the
warehouse) and commits them, in order, when it can, several small batches per commit.

Readers cannot write or read other files: every read-only connection is opened with DuckDB's
`enable_external_access = false` (COPY ... TO, EXPORT DATABASE, ATTACH, INSTALL, LOAD and the
file-reading table functions are refused, and SQL cannot turn it back on), and the views and
macros the package defines are recreated per connection as temporary objects from the package's
own views.sql, shadowing whatever the file holds under those names.

Durability (measured on DuckDB here): after an error inside a transaction a later COMMIT can
return normally and roll everything back, and several statements sent as one string are not
atomic. So each commit is one explicit BEGIN ... COMMIT of single statements, and its `batches`
rows are read back afterwards; if one is missing the write failed, loudly.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import time
import uuid
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path

import duckdb
import pyarrow as pa

from actwh.errors import WarehouseError
from actwh.warehouse.schema import BIG_TABLES, SCHEMA_VERSION, build_metadata

log = logging.getLogger("actwh.warehouse")
VIEWS_SQL = Path(__file__).with_name("views.sql")
LOCK_RE = re.compile(r"Conflicting lock is held in (.*?) \(PID (\d+)\)")
TELL_AFTER_S = 1.0  # a writer mentions who holds the file once it has been held this long
READER_CONFIG = {"enable_external_access": False}
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
# Deleting a run: one static statement per table, children first.
RUN_DELETES = {
    "edges": "DELETE FROM edges WHERE run_id = $run",
    "pair_scalars": "DELETE FROM pair_scalars WHERE run_id = $run",
    "node_scalars": "DELETE FROM node_scalars WHERE run_id = $run",
    "tokens": "DELETE FROM tokens WHERE run_id = $run",
    "prompts": "DELETE FROM prompts WHERE run_id = $run",
    "batches": "DELETE FROM batches WHERE run_id = $run",
    "runs": "DELETE FROM runs WHERE run_id = $run",
}
# The evaluation tables (`actwh evaluate`, `verify`, stored circuits) hold rows of a run too, but
# a file made before they existed lacks them: deleted from only where they exist.
EVAL_DELETES = {
    "circuit_evals": "DELETE FROM circuit_evals WHERE run_id = $run",
    "node_effects": "DELETE FROM node_effects WHERE run_id = $run",
    "edge_effects": "DELETE FROM edge_effects WHERE run_id = $run",
    "evaluations": "DELETE FROM evaluations WHERE run_id = $run",
    "circuits": "DELETE FROM circuits WHERE run_id = $run",
}
TABLES_SQL = "SELECT table_name FROM information_schema.tables"
ENUM_VALUES_SQL = {
    "scalar": "SELECT unnest(enum_range(NULL::scalar))::VARCHAR",
    "node_type": "SELECT unnest(enum_range(NULL::node_type))::VARCHAR",
}
_IDENT = re.compile(r"^[a-z_][a-z0-9_]*$")


COLUMNS_SQL = "SELECT table_name, column_name FROM information_schema.columns"


def _ddl(template: str, **names: str) -> str:
    """DDL naming schema objects (never user values): identifiers checked, then formatted."""
    for n in names.values():
        if not _IDENT.match(n):
            raise WarehouseError(f"not an identifier: {n!r}")
    return template.format(**names)


def _now() -> datetime:
    return datetime.now(timezone.utc).replace(tzinfo=None)


class WarehouseLocked(WarehouseError):
    """Another process holds the file; `holder` says which (pid and program when DuckDB tells)."""

    def __init__(self, path, holder: str):
        self.holder = holder
        super().__init__(f"{path} is locked by {holder}")


def _is_lock_error(e: Exception) -> bool:
    """DuckDB's own lock message; a corrupted file's "block ..." messages are not locks."""
    text = str(e)
    return "Could not set lock on file" in text or "Conflicting lock" in text


def _holder(e: Exception) -> str:
    m = LOCK_RE.search(str(e))
    if not (m and m.group(2)):
        return "another process"
    pid = m.group(2)
    try:
        cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode().strip()
    except OSError:
        cmd = m.group(1)
    return f"process {pid} ({cmd[:80]})" if cmd else f"process {pid}"


def _open(path, read_only: bool) -> duckdb.DuckDBPyConnection:
    """One attempt; a lock becomes WarehouseLocked, anything else a one-line WarehouseError."""
    try:
        if read_only:
            return duckdb.connect(str(path), read_only=True, config=READER_CONFIG)
        return duckdb.connect(str(path))
    except duckdb.Error as e:
        if _is_lock_error(e):
            raise WarehouseLocked(path, _holder(e)) from None
        first = str(e).splitlines()[0]
        if any(m in first for m in CORRUPT_MARKS):
            raise WarehouseError(one_line(e, path)) from None
        raise WarehouseError(f"cannot open {path}: {first}") from None


def connect(path: str | os.PathLike, read_only: bool, wait_s: float | None = 10.0,
            on_wait=None) -> duckdb.DuckDBPyConnection:
    """Open the file, retrying while another process holds a conflicting lock (for ever when
    wait_s is None). A reader's connection cannot touch other files and sees the package's views."""
    deadline = None if wait_s is None else time.monotonic() + wait_s
    delay, told = 0.02, False
    while True:
        try:
            con = _open(path, read_only)
            break
        except WarehouseLocked as e:
            if deadline is not None and time.monotonic() >= deadline:
                raise WarehouseLocked(path, e.holder) from None
            if on_wait is not None and not told:
                on_wait(f"waiting for {e.holder}, which holds {path}")
                told = True
            time.sleep(delay)
            delay = min(delay * 2, 0.1)
    if read_only:
        try:
            package_views(con)
        except BaseException:
            con.close()
            raise
    return con


def package_views(con, temporary: bool = True) -> None:
    """The package's views and macros (views.sql); as temporary objects they shadow the file's."""
    for statement in VIEWS_SQL.read_text().split(";\n"):
        statement = "\n".join(l for l in statement.splitlines() if not l.lstrip().startswith("--"))
        if not statement.strip():
            continue
        if temporary:
            statement = re.sub(r"CREATE\s+OR\s+REPLACE\s+(MACRO|VIEW|FUNCTION)",
                               r"CREATE OR REPLACE TEMP \1", statement, count=1, flags=re.I)
        try:
            con.execute(statement)
        except duckdb.Error as e:
            if temporary:  # an older file may lack a column a view names: that view stays out
                log.debug("view not recreated: %s", str(e).splitlines()[0])
                continue
            raise


def check_writable(path: str | os.PathLike) -> Path:
    """Where a warehouse can be written: an existing folder we may write, not a folder itself."""
    path = Path(path)
    parent = path.parent if str(path.parent) else Path(".")
    if path.is_dir():
        raise WarehouseError(f"--db {path} is a folder, not a warehouse file")
    if not parent.is_dir():
        raise WarehouseError(f"cannot write {path}: no folder {parent}")
    if not os.access(parent, os.W_OK | os.X_OK) or (path.exists() and not os.access(path, os.W_OK)):
        raise WarehouseError(f"cannot write {path}: permission denied")
    return path


class Warehouse:
    """Read access: `Warehouse(path).sql(query, **params) -> polars.DataFrame`."""

    def __init__(self, path: str | os.PathLike, wait_s: float = 10.0):
        self.path = Path(path)
        if not self.path.exists():
            raise WarehouseError(f"no warehouse at {self.path}")
        if not self.path.is_file():
            raise WarehouseError(f"{self.path} is not a warehouse file")
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

    def arrow(self, query: str, **params) -> pa.Table:
        """The same, as an Arrow table."""
        return self._fetch(query, params, lambda rel: rel.fetch_arrow_table())

    def relation(self, query: str, **params) -> duckdb.DuckDBPyRelation:
        """A lazy DuckDB relation; holds a read-only connection until `close()`."""
        check_params(query, params)
        if self._con is None:
            self._con = connect(self.path, read_only=True, wait_s=self.wait_s)
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


@contextmanager
def interruptible(con):
    """Ctrl-C interrupts a running query (DuckDB does not see Python's signal on its own)."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.getsignal(signal.SIGINT)

    def stop(signum, frame):
        con.interrupt()

    signal.signal(signal.SIGINT, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


_STRIP = re.compile(r"'(?:[^']|'')*'|\"(?:[^\"]|\"\")*\"|--[^\n]*|/\*.*?\*/", re.S)
_PARAM = re.compile(r"\$([A-Za-z_][A-Za-z0-9_]*)")


def check_params(query: str, params: dict) -> None:
    """Every `$name` the SQL uses is given, and nothing else (DuckDB's own messages do not name them)."""
    if not query.strip().rstrip(";").strip():
        raise WarehouseError("empty query")
    used = set(_PARAM.findall(_STRIP.sub(" ", query)))
    missing = sorted(used - set(params))
    if missing:
        raise WarehouseError(f"the query uses ${missing[0]} but no value was given "
                             f"(-p {missing[0]}=VALUE)")
    extra = sorted(set(params) - used)
    if extra:
        raise WarehouseError(f"parameter {extra[0]!r} is not used by the query "
                             f"(it uses {', '.join('$' + u for u in sorted(used)) or 'none'})")


CORRUPT_MARKS = ("not a valid DuckDB", "Corrupt database file", "Could not read enough bytes",
                 "checksum")


def one_line(e: Exception, path=None) -> str:
    text = str(e).splitlines()[0] if str(e) else type(e).__name__
    if path is not None and any(m in text for m in CORRUPT_MARKS):
        return f"{path} is corrupted or not a DuckDB file: {text}"
    if "file system operations are disabled" in text or "external" in text.lower() and "disabled" in text:
        return f"refused: a read-only command cannot read or write other files ({text})"
    return text


def check_version(con, path) -> None:
    try:
        row = con.execute("SELECT value FROM actwh_meta WHERE key = 'schema_version'").fetchone()
    except duckdb.CatalogException:
        raise WarehouseError(f"{path} is not an actwh warehouse (no actwh_meta table)") from None
    except duckdb.Error as e:
        raise WarehouseError(one_line(e, path)) from None
    found = row[0] if row else None
    try:
        version = int(found)
    except (TypeError, ValueError):
        version = None
    if version != SCHEMA_VERSION:
        raise WarehouseError(f"{path} has schema version {found if found is not None else 'none'}; "
                             f"this actwh reads version {SCHEMA_VERSION}")


def enum_columns(node_types, scalars) -> dict[str, list[tuple[str, str]]]:
    """ENUM type name -> the (table, column) pairs that use it, from the schema itself."""
    import sqlalchemy as sa

    out: dict[str, list[tuple[str, str]]] = {}
    for table in build_metadata(node_types, scalars).tables.values():
        for col in table.columns:
            if isinstance(col.type, sa.Enum):
                out.setdefault(col.type.name, []).append((table.name, col.name))
    return out


class WarehouseWriter:
    """Write access; creates the file and schema if needed, and brings an older file's ENUMs up
    to date. `append_batch` writes one batch now; `queue_batch` + `flush` group small batches
    into one commit and hold them while another process has the file."""

    def __init__(self, path: str | os.PathLike, node_types, scalars, wait_s: float | None = 60.0,
                 on_wait=None, checkpoint_every: int = 8, group_rows: int = 200_000,
                 group_seconds: float = 2.0, hold_bytes: int = 256 << 20):
        self.path = check_writable(path)
        self.wait_s, self.on_wait = wait_s, on_wait
        self.checkpoint_every = checkpoint_every
        self.group_rows, self.group_seconds, self.hold_bytes = group_rows, group_seconds, hold_bytes
        self._commits_since_checkpoint = 0
        self._pending: list[tuple[int, object, int]] = []  # (run_id, tables or spill path, rows)
        self._held_bytes = 0
        self._last_commit = time.monotonic()
        self._staging: Path | None = None
        self._told_holder: str | None = None
        self._locked_since: float | None = None
        self.commits = 0
        self.node_types, self.scalars = tuple(node_types), tuple(scalars)
        self._remove_leftovers()
        if not self.path.exists():
            self._create(self.node_types, self.scalars)
        with self.connection() as con:
            check_version(con, self.path)
            self._migrate_enums(con)
            self._add_columns(con)

    # -- creating and opening ---------------------------------------------------------------

    def _create(self, node_types, scalars) -> None:
        """Build the schema in a private file, then link it under the real name unless someone
        else got there first: a second writer or a full disk never leaves a half-made file."""
        import sqlalchemy as sa

        tmp = self.path.with_name(f".{self.path.name}.creating-{os.getpid()}-{uuid.uuid4().hex[:8]}")
        engine = sa.create_engine(f"duckdb:///{tmp}")
        try:
            md = build_metadata(node_types, scalars)
            md.create_all(engine)
            with engine.begin() as c:
                c.execute(md.tables["actwh_meta"].insert(),
                          [{"key": "schema_version", "value": str(SCHEMA_VERSION)}])
            engine.dispose()
            con = duckdb.connect(str(tmp))
            try:
                package_views(con, temporary=False)
                con.execute("CHECKPOINT")
            finally:
                con.close()
            try:
                os.link(tmp, self.path)  # atomic, and never replaces a file another writer made
            except FileExistsError:
                pass
        except Exception as e:
            msg = getattr(e, "orig", None) or e
            raise WarehouseError(f"cannot create {self.path}: {str(msg).splitlines()[0]}") from None
        finally:
            engine.dispose()
            for leftover in (tmp, tmp.with_name(tmp.name + ".wal")):
                leftover.unlink(missing_ok=True)

    def _migrate_enums(self, con) -> None:
        """Add the ENUM values this actwh knows and the file lacks (DuckDB cannot alter an ENUM:
        the columns go through VARCHAR to a re-created type, in one transaction)."""
        wanted = {"node_type": self.node_types, "scalar": self.scalars}
        users = enum_columns(self.node_types, self.scalars)
        changes = {}
        for name, values in wanted.items():
            have = [r[0] for r in con.execute(ENUM_VALUES_SQL[name]).fetchall()]
            missing = [v for v in values if v not in have]
            if missing:
                changes[name] = have + missing  # old codes keep their order
        if not changes:
            return
        con.execute("BEGIN TRANSACTION")
        try:
            for name, values in changes.items():
                for table, column in users[name]:
                    con.execute(_ddl("ALTER TABLE {t} ALTER COLUMN {c} SET DATA TYPE VARCHAR",
                                     t=table, c=column))
                con.execute(_ddl("DROP TYPE {n}", n=name))
                for v in values:  # names from the package's registry, checked like identifiers
                    _ddl("{v}", v=v)
                con.execute(_ddl("CREATE TYPE {n} AS ENUM (", n=name)
                            + ", ".join("'" + v + "'" for v in values) + ")")
                for table, column in users[name]:
                    con.execute(_ddl("ALTER TABLE {t} ALTER COLUMN {c} SET DATA TYPE {n}",
                                     t=table, c=column, n=name))
            package_views(con, temporary=False)
            con.execute("COMMIT")
        except BaseException as e:
            try:
                con.execute("ROLLBACK")
            except duckdb.Error:
                pass
            if isinstance(e, duckdb.Error):
                raise WarehouseError(f"cannot add {sorted(changes)} values to {self.path}: "
                                     f"{one_line(e)}") from None
            raise
        log.info("added ENUM values to %s: %s", self.path, changes)

    def _add_columns(self, con) -> None:
        """Add the nullable columns of this schema that an older file lacks (NULL in its rows),
        and recreate the file's views, which may name them."""
        from duckdb_sqlalchemy import Dialect

        have = set(con.execute(COLUMNS_SQL).fetchall())
        md = build_metadata(self.node_types, self.scalars)
        tables = {t for t, _ in have}  # a table the file lacks altogether is not this one's job
        missing = [(t.name, c.name, c.type.compile(dialect=Dialect())) for t in md.tables.values()
                   if t.name in tables for c in t.columns if (t.name, c.name) not in have and c.nullable]
        if not missing:
            return
        con.execute("BEGIN TRANSACTION")
        try:
            for table, column, kind in missing:
                con.execute(_ddl("ALTER TABLE {t} ADD COLUMN {c} {k}", t=table, c=column,
                                 k=kind.lower()))
            package_views(con, temporary=False)
            con.execute("COMMIT")
        except BaseException:
            con.execute("ROLLBACK")
            raise
        log.info("added columns to %s: %s", self.path, missing)

    @contextmanager
    def connection(self, wait_s: float | None | str = "default"):
        con = connect(self.path, read_only=False,
                      wait_s=self.wait_s if wait_s == "default" else wait_s, on_wait=self.on_wait)
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

    # -- models, autoencoders, runs --------------------------------------------------------

    def start_run(self, model: dict, saes: list[dict], **run) -> int:
        """Register the model and autoencoders and create the run, in one transaction (and one
        opening of the file): a run row never exists without them, nor they without it."""
        with self.transaction() as con:
            model_id = self._register_model(con, model)
            run_id = self._create_run(con, model_id, **run)
            for info in saes:
                self._register_sae(con, model_id, info)
        return run_id

    def register_model(self, info: dict) -> int:
        """The model's id, adding a row the first time these weights are seen."""
        with self.transaction() as con:
            return self._register_model(con, info)

    @staticmethod
    def _register_model(con, info: dict) -> int:
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
            return self._register_sae(con, model_id, info)

    @staticmethod
    def _register_sae(con, model_id: int, info: dict) -> int:
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
            return self._create_run(con, model_id, **run)

    @staticmethod
    def _create_run(con, model_id: int, **run) -> int:
        run_id = con.execute("SELECT coalesce(max(run_id), 0) + 1 FROM runs").fetchone()[0]
        con.execute("INSERT INTO runs VALUES ($run_id, $model_id, $name, $created_at, NULL, "
                    "'running', $target, $scalars, $selection, $code_version, $device, $dtype, "
                    "$n_prompts, $options)",
                    {**run, "run_id": run_id, "model_id": model_id, "created_at": _now(),
                     "options": json.dumps(run["options"])})
        return run_id

    def run(self, run_id: int) -> dict:
        with self.connection() as con:
            return read_run(con, run_id, self.path)

    def done_prompts(self, run_id: int) -> set[int]:
        with self.connection() as con:
            return {r[0] for r in con.execute("SELECT prompt_id FROM prompts WHERE run_id = $run",
                                              {"run": run_id}).fetchall()}

    def delete_run(self, run_id: int) -> dict[str, int]:
        """Remove one run's rows from every table, in one transaction; rows removed per table."""
        with self.transaction() as con:
            if con.execute("SELECT count(*) FROM runs WHERE run_id = $run",
                           {"run": run_id}).fetchone()[0] == 0:
                ids = [r[0] for r in con.execute("SELECT run_id FROM runs ORDER BY 1").fetchall()]
                raise WarehouseError(f"no run {run_id} in {self.path}; runs: "
                                     f"{', '.join(map(str, ids)) or 'none'}")
            removed = {}
            present = {r[0] for r in con.execute(TABLES_SQL).fetchall()}
            deletes = {**{t: q for t, q in EVAL_DELETES.items() if t in present}, **RUN_DELETES}
            try:
                for table, statement in deletes.items():
                    removed[table] = con.execute(statement, {"run": run_id}).fetchone()[0]
            except duckdb.Error as e:
                raise WarehouseError(f"run {run_id} was not deleted: {one_line(e)}") from None
        with self.connection() as con:
            con.execute("CHECKPOINT")
        return removed

    # -- batches ----------------------------------------------------------------------------

    def append_batch(self, run_id: int, tables: dict[str, pa.Table]) -> int:
        """Write one batch (prompts, tokens, node_scalars, pair_scalars, edges) atomically now."""
        with self.connection() as con:
            return self._commit(con, [(run_id, tables, 0)])[0]

    def queue_batch(self, run_id: int, tables: dict[str, pa.Table]) -> None:
        """Hold a finished batch; commit the held ones (several per commit) when they reach
        `group_rows` rows or `group_seconds` since the last commit, if the file is free now.
        While another process holds it, batches wait in memory up to `hold_bytes`, then in a
        staging folder beside the warehouse."""
        rows = sum(t.num_rows for t in tables.values())
        size = sum(t.nbytes for t in tables.values())
        if self._held_bytes + size > self.hold_bytes:
            held: object = self._spill(tables)
        else:
            held = tables
            self._held_bytes += size
        self._pending.append((run_id, held, rows))
        due = (sum(r for *_, r in self._pending) >= self.group_rows
               or time.monotonic() - self._last_commit >= self.group_seconds)
        if due:
            self._flush(wait=False)

    @property
    def held(self) -> int:
        """Batches computed and not yet committed."""
        return len(self._pending)

    def flush(self) -> None:
        """Commit every held batch, waiting (for ever unless wait_s is set) for the file."""
        self._flush(wait=True)

    def _flush(self, wait: bool) -> None:
        waited_since = time.monotonic()
        while self._pending:
            try:
                con = connect(self.path, read_only=False, wait_s=0)
            except WarehouseLocked as e:
                if not wait:
                    self._tell(e.holder)
                    return
                self._tell(e.holder)
                if self.wait_s is not None and time.monotonic() - waited_since >= self.wait_s:
                    raise WarehouseLocked(self.path, e.holder) from None
                time.sleep(0.1)
                continue
            try:
                while self._pending:  # in order, at most group_rows rows per commit
                    group, rows = [], 0
                    while self._pending and (not group or rows + self._pending[0][2] <= self.group_rows):
                        group.append(self._pending.pop(0))
                        rows += group[-1][2]
                    try:
                        self._commit(con, group)
                    except BaseException:
                        self._pending[:0] = group
                        raise
                    for _, held, _ in group:
                        if isinstance(held, Path):
                            held.unlink(missing_ok=True)
                        else:
                            self._held_bytes -= sum(t.nbytes for t in held.values())
            finally:
                con.close()
        self._last_commit = time.monotonic()
        if self._told_holder is not None and self.on_wait is not None:
            self.on_wait(f"{self.path} is free again; the held batches are written")
        self._told_holder = self._locked_since = None
        if self._staging is not None:
            shutil.rmtree(self._staging, ignore_errors=True)
            self._staging = None

    def discard(self) -> None:
        """Drop what is held (an interrupted run: the resume recomputes it) and its staging."""
        self._pending.clear()
        self._held_bytes = 0
        if self._staging is not None:
            shutil.rmtree(self._staging, ignore_errors=True)
            self._staging = None

    def _remove_leftovers(self) -> None:
        """Half-made files and staging folders of writers that were killed (process gone)."""
        for kind in ("creating", "staging"):
            for left in self.path.parent.glob(f".{self.path.name}.{kind}-*"):
                pid = left.name.split(f".{kind}-", 1)[1].split("-", 1)[0].split(".", 1)[0]
                if not pid.isdigit() or int(pid) == os.getpid() or Path(f"/proc/{pid}").exists():
                    continue
                if left.is_dir():
                    shutil.rmtree(left, ignore_errors=True)
                else:
                    left.unlink(missing_ok=True)

    def _tell(self, holder: str) -> None:
        now = time.monotonic()
        if self._locked_since is None:
            self._locked_since = now
        if now - self._locked_since < TELL_AFTER_S:  # a reader's brief query: not worth a word
            return
        if self._told_holder != holder and self.on_wait is not None:
            where = f", spilling to {self._staging}" if self._staging else ""
            self.on_wait(f"{holder} holds {self.path}; computing on and holding finished batches "
                         f"({len(self._pending)} so far{where})")
        self._told_holder = holder

    def _spill(self, tables: dict[str, pa.Table]) -> Path:
        if self._staging is None:
            self._staging = self.path.with_name(f".{self.path.name}.staging-{os.getpid()}")
            self._staging.mkdir(exist_ok=True)
        path = self._staging / f"{uuid.uuid4().hex}.arrows"
        with pa.OSFile(str(path), "wb") as f:
            names = [n for n, t in tables.items()]
            for n in names:  # one IPC stream per table, concatenated with a length prefix
                sink = pa.BufferOutputStream()
                with pa.ipc.new_stream(sink, tables[n].schema) as w:
                    w.write_table(tables[n])
                buf = sink.getvalue()
                head = json.dumps({"table": n, "bytes": buf.size}).encode()
                f.write(len(head).to_bytes(4, "little") + head)
                f.write(buf)
        return path

    @staticmethod
    def _unspill(path: Path) -> dict[str, pa.Table]:
        out = {}
        with pa.memory_map(str(path)) as f:
            data = f.read_buffer()
        pos = 0
        while pos < data.size:
            n = int.from_bytes(data[pos:pos + 4].to_pybytes(), "little")
            head = json.loads(data[pos + 4:pos + 4 + n].to_pybytes())
            pos += 4 + n
            out[head["table"]] = pa.ipc.open_stream(data[pos:pos + head["bytes"]]).read_all()
            pos += head["bytes"]
        return out

    def _commit(self, con, group) -> list[int]:
        """Write the batches in one transaction, then read their bookkeeping rows back: a
        silently rolled-back COMMIT cannot pass for a write."""
        ids, expect = [], []
        con.execute("BEGIN TRANSACTION")
        try:
            for run_id, held, _ in group:
                tables = self._unspill(held) if isinstance(held, Path) else held
                counts = {t: tables[t].num_rows if t in tables else 0 for t in BIG_TABLES}
                batch_id = con.execute("SELECT coalesce(max(batch_id), 0) + 1 FROM batches "
                                       "WHERE run_id = $run", {"run": run_id}).fetchone()[0]
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
                ids.append(batch_id)
                expect.append((run_id, batch_id, counts["node_scalars"]))
            con.execute("COMMIT")
        except BaseException as e:
            try:
                con.execute("ROLLBACK")
            except duckdb.Error:
                pass
            if isinstance(e, duckdb.Error):
                raise WarehouseError(f"batch {ids[-1] + 1 if ids else 'of'} run {group[0][0]} was "
                                     f"not written: {one_line(e)}") from None
            raise
        for run_id, batch_id, nodes in expect:
            found = con.execute("SELECT n_node_rows FROM batches WHERE run_id = $run AND "
                                "batch_id = $batch", {"run": run_id, "batch": batch_id}).fetchone()
            if found is None or found[0] != nodes:
                raise WarehouseError(f"batch {batch_id} of run {run_id} did not land: the commit "
                                     "was rolled back")
        self.commits += 1
        self._commits_since_checkpoint += 1
        if self._commits_since_checkpoint >= self.checkpoint_every:
            con.execute("CHECKPOINT")
            self._commits_since_checkpoint = 0
        return ids

    def finish_run(self, run_id: int) -> str:
        """Commit what is held; mark the run complete if every prompt is in; return its status."""
        self.flush()
        with self.connection() as con:
            con.execute("BEGIN TRANSACTION")
            try:
                n, expected = con.execute(
                    "SELECT (SELECT count(*) FROM prompts WHERE run_id = $run), n_prompts FROM runs "
                    "WHERE run_id = $run", {"run": run_id}).fetchone()
                status = "complete" if n == expected else "running"
                con.execute("UPDATE runs SET status = $status, finished_at = $at WHERE run_id = $run",
                            {"status": status, "at": _now() if status == "complete" else None,
                             "run": run_id})
            except BaseException:
                con.execute("ROLLBACK")
                raise
            con.execute("COMMIT")
            con.execute("CHECKPOINT")
        return status


def read_run(con, run_id: int, path) -> dict:
    cur = con.execute("SELECT * FROM runs WHERE run_id = $run", {"run": run_id})
    row = cur.fetchone()
    if row is None:
        ids = [r[0] for r in con.execute("SELECT run_id FROM runs ORDER BY 1").fetchall()]
        raise WarehouseError(f"no run {run_id} in {path}; runs: {', '.join(map(str, ids)) or 'none'}")
    cols = [d[0] for d in cur.description]
    out = dict(zip(cols, row))
    out["options"] = json.loads(out["options"])
    return out
