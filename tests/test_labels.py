"""Node labels: the SQL macro (views.sql) and Python (`actwh.ontology.node_label`) agree."""

from __future__ import annotations

import duckdb
import pytest

from actwh.compute.scalars import SCALARS
from actwh.ontology import LABELS, NODE_TYPES, node_label, node_label_sql
from actwh.queries.circuit import find_circuit, label
from actwh.runner import EdgeOptions, PopulateOptions, populate
from actwh.warehouse import Warehouse, WarehouseWriter
from actwh.warehouse.store import VIEWS_SQL

from conftest import IOI_ROWS, write_prompts


def test_views_sql_holds_the_generated_macro():
    assert node_label_sql() + ";\n" in VIEWS_SQL.read_text(), (
        "warehouse/views.sql's node_label is stale; paste in "
        "python -c 'from actwh.ontology import node_label_sql; print(node_label_sql())'")
    assert set(LABELS) == set(NODE_TYPES)  # every node type has a readable name


def test_known_labels():
    assert node_label(3, "attn_head", 5) == "L3H5"
    assert node_label(2, "mlp_neuron", 117) == "L2N117"
    assert node_label(1, "mlp", 0) == "L1.mlp"
    assert node_label(-1, "embed", 0) == "emb"
    assert node_label(0, "sae_latent", 9) == "L0F9"
    assert node_label(0, "sae_error", 0) == "L0.err"
    assert node_label(3, "logit", 17, " Mary") == 'logit:" Mary"'
    assert node_label(3, "logit", 17) == "logit17"
    assert node_label(3, "logit", -1) == "logit"  # the loss has no target token
    assert node_label(1, "mlp_expert", 4) == "L1E4"
    assert node_label(1, "new_type", 4) == "new_type1_4"  # a type without an entry


@pytest.mark.parametrize("node_type", [*NODE_TYPES, "new_type"])
def test_sql_and_python_agree_on_every_node_type(tmp_path, node_type):
    db = tmp_path / "w.duckdb"
    WarehouseWriter(db, NODE_TYPES, tuple(SCALARS))  # the file's own macro, as a warehouse has it
    con = duckdb.connect(str(db), read_only=True)
    for layer, index, token in [(-1, 0, None), (0, 0, None), (2, 13, None), (3, -1, None),
                                (3, 7, " Mary"), (1, 4, 'say "hi"'), (1, 4, "it's"), (0, 2, "")]:
        sql = con.execute("SELECT node_label($layer, $type, $index, token := $token)",
                          {"layer": layer, "type": node_type, "index": index,
                           "token": token}).fetchone()[0]
        assert sql == node_label(layer, node_type, index, token)
        if token is None:  # the three-argument form saved queries use
            three = con.execute("SELECT node_label($layer, $type, $index)",
                                {"layer": layer, "type": node_type, "index": index}).fetchone()[0]
            assert three == sql


def test_stored_views_label_as_python_does(tmp_path, gpt2_dir):
    """Every labelled row of a real run (node-level edges reach heads, neurons, embeddings and
    the target) carries Python's label for its node."""
    db = tmp_path / "w.duckdb"
    prompts = write_prompts(tmp_path / "p.jsonl")
    populate(db, PopulateOptions(prompts=str(prompts), model=str(gpt2_dir), batch_size=4,
                                 scalars=("mlp_post_act", "attn_act_times_grad", "token_attribution"),
                                 edges=EdgeOptions(into=3, positions="each", select="top-k:20")),
             progress=False)
    wh = Warehouse(db)
    edges = wh.sql("SELECT prompt_id, up_layer, up_type::VARCHAR AS up_type, up_index, down_layer, "
                   "down_type::VARCHAR AS down_type, down_index, down_input::VARCHAR AS down_input, "
                   "up_label, down_label FROM edges_labeled")
    types = set(edges["up_type"]) | set(edges["down_type"])
    assert {"embed", "attn_head", "mlp_neuron", "logit"} <= types
    for r in edges.iter_rows(named=True):
        assert r["up_label"] == node_label(r["up_layer"], r["up_type"], r["up_index"])
        token = IOI_ROWS[r["prompt_id"]]["target"]  # the prompt file's target, as written
        down = node_label(r["down_layer"], r["down_type"], r["down_index"], token)
        assert r["down_label"] == down + ("" if r["down_input"] is None else "." + r["down_input"])
        if r["down_type"] == "logit":
            assert down == f'logit:"{token}"'
    # a circuit's labels: the same, with positions; the target shows its token
    for prompt in (0, 2):
        c = find_circuit(wh, 1, prompt, "top-n", n=1000)
        token = IOI_ROWS[prompt]["target"]
        for r in c.edges.iter_rows(named=True):
            assert r["down_label"] == label(r["down_layer"], r["down_type"], r["down_index"],
                                            r["down_pos"], token)
        assert f'logit:"{token}"@' in " ".join(c.nodes["label"])
    nodes = wh.sql("SELECT layer, node_type::VARCHAR AS node_type, node_index, node_label FROM nodes")
    assert set(nodes["node_type"]) == {"mlp_neuron", "attn_head", "embed"}
    for r in nodes.iter_rows(named=True):
        assert r["node_label"] == node_label(r["layer"], r["node_type"], r["node_index"])
    pairs = wh.sql("SELECT DISTINCT layer, head, node_label FROM pairs")
    for r in pairs.iter_rows(named=True):
        assert r["node_label"] == node_label(r["layer"], "attn_head", r["head"])


def test_an_older_file_gains_the_target_token_column(tmp_path, gpt2_dir):
    db = tmp_path / "old.duckdb"
    WarehouseWriter(db, NODE_TYPES, tuple(SCALARS))
    con = duckdb.connect(str(db))  # as files made before target_token was stored
    con.execute("DROP VIEW edges_labeled")
    con.execute("ALTER TABLE prompts DROP COLUMN target_token")
    con.close()
    prompts = write_prompts(tmp_path / "p.jsonl", IOI_ROWS[:2])
    populate(db, PopulateOptions(prompts=str(prompts), model=str(gpt2_dir), scalars=("mlp_post_act",),
                                 edges=EdgeOptions(select="top-k:5")), progress=False)
    wh = Warehouse(db)
    got = wh.sql("SELECT prompt_id, target_token FROM prompts ORDER BY prompt_id")
    assert got["target_token"].to_list() == ["Mary", "John"]
    labels = wh.sql("SELECT DISTINCT prompt_id, down_label FROM edges_labeled "
                    "WHERE down_type = 'logit' ORDER BY prompt_id")
    assert labels["down_label"].to_list() == ['logit:"Mary"', 'logit:"John"']
