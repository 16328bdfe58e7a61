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

# (table, key): a source row is the file's row of the same key when the CLASH_SQL columns agree
IDENTITY = (("models", "model_id"), ("saes", "sae_id"), ("runs", "run_id"))
PROMPT_TABLES = ("prompts", "tokens", "node_scalars", "pair_scalars", "edges")
CLASH_SQL = {  # the first id the source and the file hold for different things
    "models": "SELECT s.model_id FROM src_models s JOIN models f USING (model_id) WHERE "
              "s.weights_sha256 IS DISTINCT FROM f.weights_sha256 OR s.source IS DISTINCT FROM "
              "f.source ORDER BY 1 LIMIT 1",
    "saes": "SELECT s.sae_id FROM src_saes s JOIN saes f USING (sae_id) WHERE s.weights_sha256 IS "
            "DISTINCT FROM f.weights_sha256 OR s.site IS DISTINCT FROM f.site OR s.model_id IS "
            "DISTINCT FROM f.model_id ORDER BY 1 LIMIT 1",
    "runs": "SELECT s.run_id FROM src_runs s JOIN runs f USING (run_id) WHERE s.created_at IS "
            "DISTINCT FROM f.created_at OR s.model_id IS DISTINCT FROM f.model_id OR "
            "s.options::VARCHAR IS DISTINCT FROM f.options::VARCHAR ORDER BY 1 LIMIT 1",
}
NEW_ROWS_SQL = {
    "models": "INSERT INTO models SELECT * FROM src_models WHERE model_id NOT IN "
              "(SELECT model_id FROM models)",
    "saes": "INSERT INTO saes SELECT * FROM src_saes WHERE sae_id NOT IN (SELECT sae_id FROM saes)",
    "runs": "INSERT INTO runs SELECT * FROM src_runs WHERE run_id NOT IN (SELECT run_id FROM runs)",
}
STATUS_SQL = ("UPDATE runs SET status = s.status, finished_at = s.finished_at FROM src_runs s "
              "WHERE runs.run_id = s.run_id AND runs.status <> s.status AND s.status = 'complete'")
NEW_PROMPTS_SQL = ("CREATE OR REPLACE TEMP TABLE new_prompts AS SELECT run_id, prompt_id FROM "
                   "src_prompts EXCEPT SELECT run_id, prompt_id FROM prompts")
COPY_SQL = {  # the rows of the prompts the file lacks
    "prompts": "INSERT INTO prompts BY NAME SELECT s.* FROM src_prompts s SEMI JOIN new_prompts n "
               "USING (run_id, prompt_id)",
    "tokens": "INSERT INTO tokens BY NAME SELECT s.* FROM src_tokens s SEMI JOIN new_prompts n "
              "USING (run_id, prompt_id)",
    "node_scalars": "INSERT INTO node_scalars BY NAME SELECT s.* FROM src_node_scalars s SEMI JOIN "
                    "new_prompts n USING (run_id, prompt_id)",
    "pair_scalars": "INSERT INTO pair_scalars BY NAME SELECT s.* FROM src_pair_scalars s SEMI JOIN "
                    "new_prompts n USING (run_id, prompt_id)",
    "edges": "INSERT INTO edges BY NAME SELECT s.* FROM src_edges s SEMI JOIN new_prompts n "
             "USING (run_id, prompt_id)",
}
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
            for table, key in IDENTITY:
                clash = con.execute(CLASH_SQL[table]).fetchone()
                if clash is not None:
                    raise WarehouseError(f"{key} {clash[0]} of {src} is another {table[:-1]} than "
                                         f"{key} {clash[0]} in {target}; ingest into a new file")
            for table, _ in IDENTITY:
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
