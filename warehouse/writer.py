"""The DuckDB file's writer: `WarehouseWriter`, one process at a time, holding the file briefly.

A populate keeps computing while someone else holds the file, holds its finished batches (in
memory up to a bound, then spilled to a staging folder beside the warehouse) and commits them,
in order, when it can, several small batches per commit. Each commit is one transaction whose
`batches` rows are read back afterwards: a silently rolled-back COMMIT cannot pass for a write.

A batch is identified by (run_id, batch_id), batch_id being its smallest prompt id
(`batch_id_of`): batches are disjoint sets of prompts, so the id is the same however often the
batch is computed (a resume, a retried worker), and committing one twice is refused inside the
commit's transaction (`BatchAlreadyCommitted`), with the primary key of `batches` behind it.
A batch with no prompts rows (rows added to prompts already written, `append_batch`) takes the
next negative id of its run, which no populate batch can have.
"""

from __future__ import annotations

import json
import os
import shutil
import time
import uuid
from contextlib import contextmanager
from pathlib import Path

import duckdb
import pyarrow as pa

from actwh.errors import WarehouseError
from actwh.warehouse import migrate, runlock
from actwh.warehouse.ddl import BIG_TABLES
from actwh.warehouse.connection import (WarehouseLocked, _now, check_version, check_writable,
                                        connect, one_line, read_run, transaction)

TELL_AFTER_S = 1.0  # a writer mentions who holds the file once it has been held this long

# One static statement per table; columns matched by name, values come from the registered Arrow.
INSERT_SQL = {
    "prompts": "INSERT INTO prompts BY NAME SELECT * FROM batch_rows",
    "tokens": "INSERT INTO tokens BY NAME SELECT * FROM batch_rows",
    "node_scalars": "INSERT INTO node_scalars BY NAME SELECT * FROM batch_rows",
    "pair_scalars": "INSERT INTO pair_scalars BY NAME SELECT * FROM batch_rows",
    "edges": "INSERT INTO edges BY NAME SELECT * FROM batch_rows",
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
EXTRA_BATCH_SQL = ("SELECT least(coalesce(min(batch_id), 0), 0) - 1 FROM batches "
                   "WHERE run_id = $run")
DUPLICATE_SQL = "SELECT count(*) FROM batches WHERE run_id = $run AND batch_id = $batch"
TABLES_SQL = "SELECT table_name FROM information_schema.tables"

class BatchAlreadyCommitted(WarehouseError):
    """This (run, batch) is already in the warehouse: a second commit of it is refused."""

    def __init__(self, run_id: int, batch_id: int, where):
        self.run_id, self.batch_id = run_id, batch_id
        super().__init__(f"batch {batch_id} of run {run_id} is already committed in {where}")


def batch_id_of(tables: dict[str, pa.Table]) -> int:
    """A batch's id: its smallest prompt id (deterministic for a run, the same on a resume or
    a retry, distinct between batches because batches are disjoint sets of prompts)."""
    import pyarrow.compute as pc

    prompts = tables.get("prompts")
    if prompts is None or prompts.num_rows == 0:
        raise WarehouseError("a batch needs at least one prompts row")
    return int(pc.min(prompts["prompt_id"]).as_py())




class WarehouseWriter:
    """Write access; creates the file and schema if needed, and brings an older file's ENUMs up
    to date. `append_batch` writes one batch now; `queue_batch` + `flush` group small batches
    into one commit and hold them while another process has the file."""

    def __init__(self, path: str | os.PathLike, node_types, scalars, wait_s: float | None = 60.0,
                 on_wait=None, checkpoint_every: int = 8, group_rows: int = 200_000,
                 group_seconds: float = 2.0, hold_bytes: int = 256 << 20):
        from actwh.warehouse.spec import parse_spec

        spec = parse_spec(path)
        if spec.kind != "file":
            raise WarehouseError(f"--db {spec}: this writes a DuckDB file; a lake or a Parquet "
                                 "folder is written by populate only (copy it into a file with "
                                 "actwh ingest)")
        self.path = check_writable(spec.path)
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
            migrate.create_file(self.path, self.node_types, self.scalars)
        with self.connection() as con:
            check_version(con, self.path)
            migrate.migrate_enums(con, self.path, self.node_types, self.scalars)
            migrate.add_columns(con, self.path)

    # -- opening ----------------------------------------------------------------------------

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
        with self.connection() as con, transaction(con):
            yield con

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

    def claim_run(self, run_id: int) -> None:
        """Mark run_id as being written by this process until `release_run` or its end (see
        runlock.py); refused, in one line, while another process writes it."""
        runlock.claim(self.path, run_id, "write")

    def release_run(self, run_id: int) -> None:
        runlock.release(self.path, run_id)

    def delete_run(self, run_id: int) -> dict[str, int]:
        """Remove one run's rows from every table, in one transaction; rows removed per table.
        Refused while another process writes the run (a populate between two commits)."""
        runlock.claim(self.path, run_id, "delete")
        try:
            return self._delete_run(run_id)
        finally:
            runlock.release(self.path, run_id)

    def _delete_run(self, run_id: int) -> dict[str, int]:
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

        def failed(e):
            return f"batch {ids[-1] if ids else 'of'} run {group[0][0]} was not written: {one_line(e)}"

        with transaction(con, failed):
            for run_id, held, _ in group:
                tables = self._unspill(held) if isinstance(held, Path) else held
                if tables.get("prompts") is not None and tables["prompts"].num_rows:
                    batch_id = batch_id_of(tables)
                else:  # rows added to prompts already written: the next negative id
                    batch_id = con.execute(EXTRA_BATCH_SQL, {"run": run_id}).fetchone()[0]
                ids.append(batch_id)
                if con.execute(DUPLICATE_SQL, {"run": run_id, "batch": batch_id}).fetchone()[0]:
                    raise BatchAlreadyCommitted(run_id, batch_id, self.path)
                counts = {t: tables[t].num_rows if t in tables else 0 for t in BIG_TABLES}
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
                expect.append((run_id, batch_id, counts["node_scalars"]))
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
            with transaction(con):
                n, expected = con.execute(
                    "SELECT (SELECT count(*) FROM prompts WHERE run_id = $run), n_prompts FROM runs "
                    "WHERE run_id = $run", {"run": run_id}).fetchone()
                status = "complete" if n == expected else "running"
                con.execute("UPDATE runs SET status = $status, finished_at = $at WHERE run_id = $run",
                            {"status": status, "at": _now() if status == "complete" else None,
                             "run": run_id})
            con.execute("CHECKPOINT")
        return status
