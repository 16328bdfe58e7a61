"""Writers for a lake (`lake:PATH`) and a Parquet folder (`parquet:DIR`), and `open_writer`.

The writer interface (`open_writer(db, node_types, scalars, ...)` returns one of these or a
`WarehouseWriter` for a DuckDB file; the runner uses only this):

    run_id = w.start_run(model: dict, saes: list[dict], **run)   # registers model, SAEs, run
    done = w.done_prompts(run_id)                                 # set of prompt ids written
    w.queue_batch(run_id, tables)        # {table: pyarrow.Table}: prompts, tokens, node_scalars,
                                         # pair_scalars, edges; committed now or soon
    w.flush()                            # commit what is held
    status = w.finish_run(run_id)        # flush; 'complete' when every prompt is in
    w.discard()                          # drop what is held (the resume recomputes it)
    w.commits                            # commits made

Workers commit their own batches without the driver (lake and folder; a DuckDB file has one
writer, the driver): `BatchCommitter.from_spec("lake:/data/lake", run_id).commit(tables)`
returns the batch id. The spec is a plain string (picklable); the ENUM values come from the
warehouse itself, so a worker needs neither the driver nor the compute registry.

Exactly once: a batch is (run_id, batch_id), batch_id its smallest prompt id
(`writer.batch_id_of`). A lake commit checks `batches` inside its transaction while it holds
the catalog (a DuckDB file: one writer at a time, so the check and the insert cannot
interleave with another commit); a folder commit is the exclusive creation of its manifest
entry (`os.link`, which fails when the entry exists), after its data files are in place under
names no reader lists. Either way a second commit of a batch raises `BatchAlreadyCommitted`
and leaves nothing behind.

Every batch goes through an in-memory DuckDB holding the schema first (`_stage`), so values are
checked and cast exactly as a DuckDB file's writer checks them (ENUM values, NOT NULL, types).
"""

from __future__ import annotations

import json
import os
import time
import uuid
from pathlib import Path

import duckdb

from actwh.errors import WarehouseError
from actwh.warehouse import ddl, sources
from actwh.warehouse.connection import _compose, _ddl, _ident, _now, _type, one_line, transaction
from actwh.warehouse.spec import PARQUET_META, Spec, check_folder_target, parse_spec
from actwh.warehouse.writer import (DUPLICATE_SQL, BatchAlreadyCommitted, WarehouseWriter,
                                    batch_id_of)

BATCH_TABLES = ("prompts", "tokens", "node_scalars", "pair_scalars", "edges", "batches")
BATCH_ROW = ("INSERT INTO batches VALUES ($run, $batch, $n, $nodes, $pairs, $edges, $at)")


def open_writer(db, node_types, scalars, wait_s: float | None = 60.0, on_wait=None,
                group_rows: int = 200_000, group_seconds: float = 2.0,
                hold_bytes: int = 256 << 20):
    """The writer the `--db` spec names: a DuckDB file's `WarehouseWriter` (grouped, held
    commits), or a lake's or a Parquet folder's (each batch its own commit, at once)."""
    spec = parse_spec(db)
    if spec.kind == "file":
        return WarehouseWriter(spec.path, node_types, scalars, wait_s=wait_s, on_wait=on_wait,
                               group_rows=group_rows, group_seconds=group_seconds,
                               hold_bytes=hold_bytes)
    cls = LakeWriter if spec.kind == "lake" else FolderWriter
    return cls(spec, node_types, scalars, wait_s=wait_s, on_wait=on_wait)


class ShardWriter:
    """What a lake's and a folder's writers share: the staging database, queue = commit now."""

    def claim_run(self, run_id: int) -> None:
        """Nothing to mark: batches land here exactly once by their ids, and runs are not
        deleted from a lake or a folder (ingest them into a file first)."""

    def release_run(self, run_id: int) -> None:
        pass

    def __init__(self, spec: Spec, node_types=None, scalars=None, wait_s: float | None = 60.0,
                 on_wait=None):
        self.spec = check_folder_target(parse_spec(spec))
        self.wait_s, self.on_wait = wait_s, on_wait
        self.commits = 0
        self.held = 0
        self._stage = self._new_stage()
        self.node_types, self.scalars = self._open(node_types, scalars)
        with transaction(self._stage):
            for statement in ddl.statements(self.node_types, self.scalars):
                self._stage.execute(statement)

    def _staged(self, run_id: int, tables: dict) -> tuple[int, dict[str, int]]:
        """Load one batch into the staging tables (emptied first) with its batches row."""
        batch_id = batch_id_of(tables)
        counts = {t: tables[t].num_rows if t in tables else 0 for t in BATCH_TABLES}
        con = self._stage
        for table in BATCH_TABLES:
            con.execute(_ddl("DELETE FROM {t}", t=table))
        failed = lambda e: f"batch {batch_id} of run {run_id} was not written: {one_line(e)}"  # noqa: E731
        with transaction(con, failed):
            for table in BATCH_TABLES[:-1]:
                if table in tables and tables[table].num_rows:
                    con.register("batch_rows", tables[table])
                    con.execute(_ddl("INSERT INTO {t} BY NAME SELECT * FROM batch_rows", t=table))
                    con.unregister("batch_rows")
            con.execute(BATCH_ROW, {"run": run_id, "batch": batch_id, "n": counts["prompts"],
                                    "nodes": counts["node_scalars"], "pairs": counts["pair_scalars"],
                                    "edges": counts["edges"], "at": _now()})
            bad = con.execute("SELECT count(*) FROM prompts WHERE run_id <> $run",
                              {"run": run_id}).fetchone()[0]
            if bad:
                raise WarehouseError(f"batch {batch_id}: {bad} rows are not of run {run_id}")
        return batch_id, counts

    @staticmethod
    def _new_stage():
        return duckdb.connect()

    def queue_batch(self, run_id: int, tables: dict) -> None:
        """Commit the batch now (a lake or a folder takes many small commits)."""
        self.commit(run_id, tables)

    def append_batch(self, run_id: int, tables: dict) -> int:
        return self.commit(run_id, tables)

    def flush(self) -> None:
        """Nothing is held: every batch was committed when it was queued."""

    def discard(self) -> None:
        """Nothing is held."""

    def finish_run(self, run_id: int) -> str:
        n, expected = self._progress(run_id)
        status = "complete" if n == expected else "running"
        self._set_status(run_id, status)
        return status

    def close(self) -> None:
        self._stage.close()


class LakeWriter(ShardWriter):
    """A DuckLake catalog: each commit attaches it (waiting while another writer holds the
    catalog file), writes its Parquet files and catalog rows in one transaction, detaches."""

    _new_stage = staticmethod(sources.lake_connection)  # the staging tables live beside `lake`

    def _connection(self):
        return sources.attached(self._stage, self.spec, read_only=False, wait_s=self.wait_s,
                                on_wait=self.on_wait)

    def _open(self, node_types, scalars):
        """Create the lake's tables if it has none; add ENUM values it lacks to actwh_meta."""
        self.spec.path.mkdir(exist_ok=True)
        self.spec.data.mkdir(exist_ok=True)
        with self._connection() as con, transaction(
                con, lambda e: f"cannot create {self.spec}: {one_line(e)}"):
            have = con.execute("SELECT count(*) FROM duckdb_tables() WHERE database_name = "
                               "'lake' AND table_name = 'actwh_meta'").fetchone()[0]
            if not have:
                if node_types is None:
                    raise WarehouseError(f"no warehouse at {self.spec}")
                for table, cols in ddl.columns().items():
                    con.execute(_compose("CREATE TABLE {t} ({columns})", t=_ident(table),
                                         columns=", ".join(_compose(
                                             "{c} {k}{null}", c=_ident(c), null="" if nullable
                                             else " NOT NULL", k="VARCHAR" if k in ddl.ENUM_TYPES
                                             else _type(k)) for c, k, nullable in cols)))
                meta = {"schema_version": ddl.SCHEMA_VERSION, "node_types": [], "scalars": []}
            else:
                meta = sources.lake_meta(con)
                if str(meta["schema_version"]) != str(ddl.SCHEMA_VERSION):
                    raise WarehouseError(f"{self.spec} has schema version "
                                         f"{meta['schema_version']}; this actwh writes "
                                         f"version {ddl.SCHEMA_VERSION}")
            merged = _merge(meta, node_types, scalars)
            if merged != meta:
                con.execute("DELETE FROM actwh_meta")
                for key in ("schema_version", "node_types", "scalars"):
                    text = str(merged[key]) if key == "schema_version" else json.dumps(merged[key])
                    con.execute("INSERT INTO actwh_meta VALUES ($k, $v)", {"k": key, "v": text})
        return tuple(merged["node_types"]), tuple(merged["scalars"])

    def start_run(self, model: dict, saes: list[dict], **run) -> int:
        with self._connection() as con, transaction(
                con, lambda e: f"cannot start a run in {self.spec}: {one_line(e)}"):
            model_id = WarehouseWriter._register_model(con, model)
            run_id = WarehouseWriter._create_run(con, model_id, **run)
            for info in saes:
                WarehouseWriter._register_sae(con, model_id, info)
        return run_id

    def done_prompts(self, run_id: int) -> set[int]:
        with self._connection() as con:
            return {r[0] for r in con.execute("SELECT prompt_id FROM prompts WHERE run_id = $run",
                                              {"run": run_id}).fetchall()}

    def commit(self, run_id: int, tables: dict) -> int:
        batch_id, counts = self._staged(run_id, tables)
        failed = lambda e: f"batch {batch_id} of run {run_id} was not written: {one_line(e)}"  # noqa: E731
        with self._connection() as con:
            with transaction(con, failed):
                if con.execute(DUPLICATE_SQL, {"run": run_id, "batch": batch_id}).fetchone()[0]:
                    raise BatchAlreadyCommitted(run_id, batch_id, self.spec)
                for table in BATCH_TABLES:
                    if counts[table] or table == "batches":
                        con.execute(_ddl("INSERT INTO lake.{t} BY NAME SELECT * FROM memory.main.{t}",
                                         t=table))
            found = con.execute("SELECT n_node_rows FROM batches WHERE run_id = $run AND "
                                "batch_id = $batch", {"run": run_id, "batch": batch_id}).fetchone()
            if found is None or found[0] != counts["node_scalars"]:
                raise WarehouseError(f"batch {batch_id} of run {run_id} did not land: the commit "
                                     "was rolled back")
        self.commits += 1
        return batch_id

    def _progress(self, run_id: int) -> tuple[int, int]:
        with self._connection() as con:
            return con.execute("SELECT (SELECT count(*) FROM prompts WHERE run_id = $run), "
                               "n_prompts FROM runs WHERE run_id = $run", {"run": run_id}).fetchone()

    def _set_status(self, run_id: int, status: str) -> None:
        with self._connection() as con, transaction(con):
            con.execute("UPDATE runs SET status = $status, finished_at = $at WHERE run_id = $run",
                        {"status": status, "at": _now() if status == "complete" else None,
                         "run": run_id})


class FolderWriter(ShardWriter):
    """A folder of Parquet shards: data files under a temporary name then renamed; a batch is
    committed by the exclusive creation of its manifest entry."""

    def _open(self, node_types, scalars):
        root = self.spec.path
        root.mkdir(exist_ok=True)
        for sub in ("manifest", "runs", "models", "saes", *(f"data/{t}" for t in BATCH_TABLES)):
            (root / sub).mkdir(parents=True, exist_ok=True)
        meta_path = root / PARQUET_META
        if meta_path.exists():
            meta = sources.folder_meta(self.spec)
            if str(meta["schema_version"]) != str(ddl.SCHEMA_VERSION):
                raise WarehouseError(f"{self.spec} has schema version {meta['schema_version']}; "
                                     f"this actwh writes version {ddl.SCHEMA_VERSION}")
        elif node_types is None:
            raise WarehouseError(f"no warehouse at {self.spec}")
        else:
            meta = {"schema_version": ddl.SCHEMA_VERSION, "node_types": [], "scalars": []}
        merged = _merge(meta, node_types, scalars)
        if merged != meta or not meta_path.exists():
            self._write_file(meta_path, lambda tmp: tmp.write_text(json.dumps(merged, indent=1)),
                             replace=True)
        return tuple(merged["node_types"]), tuple(merged["scalars"])

    @staticmethod
    def _write_file(final: Path, write, replace: bool) -> bool:
        """Write through a temporary name beside `final`, then rename (replace) or link
        (exclusive: False when `final` already exists, and nothing is left behind)."""
        tmp = final.with_name(f".{final.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp")
        try:
            write(tmp)
            if replace:
                os.replace(tmp, final)
                return True
            try:
                os.link(tmp, final)
                return True
            except FileExistsError:
                return False
        finally:
            tmp.unlink(missing_ok=True)

    def _copy_out(self, sql: str, final: Path, replace: bool, params=None) -> bool:
        """A staging query's rows to a Parquet file at `final` (through pyarrow: no file path
        is formatted into SQL)."""
        import pyarrow.parquet as pq

        rows = self._stage.execute(sql, params).to_arrow_table()
        return self._write_file(final, lambda tmp: pq.write_table(rows, tmp, compression="zstd"),
                                replace)

    def _rows(self, table: str) -> list[str]:
        stem = sources.ROW_FOLDERS[table]
        return [str(p) for p in sorted((self.spec.path / table).glob(f"{stem}-*.parquet"))]

    def start_run(self, model: dict, saes: list[dict], **run) -> int:
        """Ids are taken by creating the row's file exclusively; a writer that loses a race
        for an id starts over."""
        con = self._stage
        for attempt in range(100):
            for table in ("models", "saes", "runs"):
                con.execute(_ddl("DELETE FROM {t}", t=table))
                files = self._rows(table)
                if files:
                    con.execute(_ddl("INSERT INTO {t} SELECT * FROM read_parquet($f)", t=table),
                                {"f": files})
            ids_before = {t: {r[0] for r in con.execute(_ddl("SELECT {k} FROM {t}", t=t, k=k)).fetchall()}
                          for t, k in (("models", "model_id"), ("saes", "sae_id"))}
            model_id = WarehouseWriter._register_model(con, model)
            run_id = WarehouseWriter._create_run(con, model_id, **run)
            sae_ids = [WarehouseWriter._register_sae(con, model_id, info) for info in saes]
            new = [("models", "model_id", model_id)] if model_id not in ids_before["models"] else []
            new += [("saes", "sae_id", i) for i in dict.fromkeys(sae_ids) if i not in ids_before["saes"]]
            new.append(("runs", "run_id", run_id))
            ok = True
            for table, key, i in new:
                final = self.spec.path / table / f"{sources.ROW_FOLDERS[table]}-{i}.parquet"
                if not self._copy_out(_ddl("SELECT * FROM {t} WHERE {k} = $id", t=table, k=key),
                                      final, replace=False, params={"id": i}):
                    ok = False
                    break
            if ok:
                return run_id
            time.sleep(0.01 * attempt)
        raise WarehouseError(f"cannot start a run in {self.spec}: ids kept being taken")

    def _run_entries(self, run_id: int) -> list[dict]:
        return [m for m in sources.manifest(self.spec) if m["run_id"] == run_id]

    def done_prompts(self, run_id: int) -> set[int]:
        files = [str(self.spec.path / m["files"]["prompts"]) for m in self._run_entries(run_id)]
        if not files:
            return set()
        return {r[0] for r in self._stage.execute("SELECT prompt_id FROM read_parquet($f)",
                                                  {"f": files}).fetchall()}

    def commit(self, run_id: int, tables: dict) -> int:
        batch_id, counts = self._staged(run_id, tables)
        entry = self.spec.path / "manifest" / f"r{run_id}-b{batch_id}.json"
        if entry.exists():  # early and cheap; the link below is what decides
            raise BatchAlreadyCommitted(run_id, batch_id, self.spec)
        token = uuid.uuid4().hex[:12]
        files, written = {}, []
        try:
            for table in BATCH_TABLES:
                if not counts[table] and table != "batches":
                    continue
                rel = f"data/{table}/r{run_id}-b{batch_id}-{token}.parquet"
                self._copy_out(_ddl("SELECT * FROM {t}", t=table), self.spec.path / rel, replace=True)
                written.append(self.spec.path / rel)
                files[table] = rel
            body = {"run_id": run_id, "batch_id": batch_id, "n_prompts": counts["prompts"],
                    "files": files, "rows": {t: counts[t] for t in files}}
            if not self._write_file(entry, lambda tmp: tmp.write_text(json.dumps(body)),
                                    replace=False):
                raise BatchAlreadyCommitted(run_id, batch_id, self.spec)
        except BaseException:
            for path in written:
                path.unlink(missing_ok=True)
            raise
        self.commits += 1
        return batch_id

    def _progress(self, run_id: int) -> tuple[int, int]:
        files = [f for f in self._rows("runs") if Path(f).name == f"run-{int(run_id)}.parquet"]
        if not files:
            raise WarehouseError(f"no run {run_id} in {self.spec}")
        expected = self._stage.execute("SELECT n_prompts FROM read_parquet($f)",
                                       {"f": files}).fetchone()[0]
        return sum(m["n_prompts"] for m in self._run_entries(run_id)), expected

    def _set_status(self, run_id: int, status: str) -> None:
        final = self.spec.path / "runs" / f"run-{int(run_id)}.parquet"
        con = self._stage
        con.execute("DELETE FROM runs")
        con.execute("INSERT INTO runs SELECT * FROM read_parquet($f)", {"f": str(final)})
        con.execute("UPDATE runs SET status = $status, finished_at = $at",
                    {"status": status, "at": _now() if status == "complete" else None})
        self._copy_out("SELECT * FROM runs", final, replace=True)


class BatchCommitter:
    """Commits one run's batches from any process: `BatchCommitter.from_spec(spec, run_id)`
    with the `--db` string; `.commit(tables)` returns the batch id, and raises
    `BatchAlreadyCommitted` for a batch that is in already (a retried task can treat that as
    done)."""

    def __init__(self, writer, run_id: int):
        self.writer, self.run_id = writer, run_id

    @classmethod
    def from_spec(cls, spec: str, run_id: int, wait_s: float | None = None) -> "BatchCommitter":
        parsed = parse_spec(spec)
        if parsed.kind == "file":
            raise WarehouseError(f"{spec}: a DuckDB file has one writer (the driver); workers "
                                 "commit their own batches to a lake or a Parquet folder")
        if not parsed.exists():
            raise WarehouseError(f"no warehouse at {spec}")
        cls_ = LakeWriter if parsed.kind == "lake" else FolderWriter
        return cls(cls_(parsed, None, None, wait_s=wait_s), run_id)

    def commit(self, tables: dict) -> int:
        return self.writer.commit(self.run_id, tables)

    def close(self) -> None:
        self.writer.close()


def _merge(meta: dict, node_types, scalars) -> dict:
    """meta with the ENUM values it lacks appended (old values keep their order)."""
    out = dict(meta)
    for key, values in (("node_types", node_types), ("scalars", scalars)):
        have = list(meta.get(key) or [])
        out[key] = have + [v for v in (values or ()) if v not in have]
    return out

