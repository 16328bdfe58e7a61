"""`actwh ingest SOURCE --db FILE`: a lake or a Parquet folder copied into one DuckDB file.

Exactly once, in one transaction: the source's tables are registered on the file's connection
as temporary views (`sources.install_views`, one snapshot of the source), and only what the
file lacks is added: models, autoencoders and runs by id (an id the file holds for something
else is refused, naming it), then every row of the prompts the file does not hold yet, with the
batches rows the file lacks. Running it again adds nothing; a run that was still being written
gains its new batches (and its status) on the next ingest. A failure anywhere leaves the file
as it was.
"""

from __future__ import annotations

import duckdb

from actwh.errors import WarehouseError
from actwh.warehouse import sources
from actwh.warehouse.connection import one_line, transaction
from actwh.warehouse.spec import parse_spec
from actwh.warehouse.writer import WarehouseWriter

# (table, key columns, columns that must agree for the same key to be the same thing)
IDENTITY = (("models", "model_id", ("weights_sha256", "source")),
            ("saes", "sae_id", ("weights_sha256", "site", "model_id")),
            ("runs", "run_id", ("created_at", "model_id", "options")))
PROMPT_TABLES = ("prompts", "tokens", "node_scalars", "pair_scalars", "edges")
CLASH_SQL = {t: (f"SELECT s.{k} FROM src_{t} s JOIN {t} f USING ({k}) WHERE "
                 + " OR ".join(f"s.{c}::VARCHAR IS DISTINCT FROM f.{c}::VARCHAR" for c in same)
                 + " ORDER BY 1 LIMIT 1") for t, k, same in IDENTITY}
NEW_ROWS_SQL = {t: f"INSERT INTO {t} SELECT * FROM src_{t} WHERE {k} NOT IN (SELECT {k} FROM {t})"
                for t, k, _ in IDENTITY}
STATUS_SQL = ("UPDATE runs SET status = s.status, finished_at = s.finished_at FROM src_runs s "
              "WHERE runs.run_id = s.run_id AND runs.status <> s.status AND s.status = 'complete'")
NEW_PROMPTS_SQL = ("CREATE OR REPLACE TEMP TABLE new_prompts AS SELECT run_id, prompt_id FROM "
                   "src_prompts EXCEPT SELECT run_id, prompt_id FROM prompts")
COPY_SQL = {t: f"INSERT INTO {t} BY NAME SELECT s.* FROM src_{t} s SEMI JOIN new_prompts n "
               "USING (run_id, prompt_id)" for t in PROMPT_TABLES}
BATCHES_SQL = ("INSERT INTO batches SELECT * FROM src_batches s WHERE NOT EXISTS (SELECT 1 FROM "
               "batches b WHERE b.run_id = s.run_id AND b.batch_id = s.batch_id)")


def ingest(source, db, node_types=(), scalars=(), on_wait=None) -> dict[str, int]:
    """Copy what `db` (a DuckDB file) lacks of `source` (`lake:PATH` or `parquet:DIR`); rows
    added per table (all zero when the file already holds everything)."""
    src = parse_spec(source)
    if src.kind == "file":
        raise WarehouseError(f"ingest reads a lake (lake:PATH) or a Parquet folder "
                             f"(parquet:DIR), not a DuckDB file: {source}")
    target = parse_spec(db)
    if target.kind != "file":
        raise WarehouseError(f"ingest writes a DuckDB file (--db FILE), not {target}")
    if not src.exists():
        raise WarehouseError(f"no warehouse at {src}")
    meta, found = sources.sources(src)
    writer = WarehouseWriter(target.path, tuple(dict.fromkeys([*node_types, *meta["node_types"]])),
                             tuple(dict.fromkeys([*scalars, *meta["scalars"]])), wait_s=None,
                             on_wait=on_wait)
    added: dict[str, int] = {}

    def failed(e):
        return f"nothing was ingested from {src}: {one_line(e)}"

    with writer.connection() as con:
        sources.install_views(con, found, prefix="src_", temporary=True)
        with transaction(con, failed):
            for table, key, _ in IDENTITY:
                clash = con.execute(CLASH_SQL[table]).fetchone()
                if clash is not None:
                    raise WarehouseError(f"{key} {clash[0]} of {src} is another {table[:-1]} than "
                                         f"{key} {clash[0]} in {target}; ingest into a new file")
            for table, _, _ in IDENTITY:
                added[table] = con.execute(NEW_ROWS_SQL[table]).fetchone()[0]
            con.execute(STATUS_SQL)
            con.execute(NEW_PROMPTS_SQL)
            for table in PROMPT_TABLES:
                added[table] = con.execute(COPY_SQL[table]).fetchone()[0]
            added["batches"] = con.execute(BATCHES_SQL).fetchone()[0]
            con.execute("DROP TABLE new_prompts")
        try:
            con.execute("CHECKPOINT")
        except duckdb.Error:
            pass
    return added
