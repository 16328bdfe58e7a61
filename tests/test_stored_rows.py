"""What `populate` stores, row by row, against references computed without actwh's compute code.

Prompts of mixed lengths, batched so that a batch's length order is not its prompt order, some
with a JSONL `position`; every stored value is checked at its stored coordinates against
`transformers` itself or a brute-force autograd reference on the prompt alone, unpadded (so
stored positions must count from the prompt's first token whatever padding the runner used).
"""

from __future__ import annotations

import json

import numpy as np
import polars as pl
import pytest
import torch

from actwh.compute.loading import load_model
from actwh.compute.targets import Batch
from actwh.runner import EdgeOptions, PopulateOptions, populate
from actwh.warehouse import Warehouse

from conftest import save_tiny
from reference import (act_and_grad, component_grad, component_outputs, hf_metric_and_loss,
                       node_edges_ref)

ROWS = [  # lengths with BOS: 15, 6, 7, 3, 14; batches of 3 sort them to (3, 1, 2), (4, 0)
    {"text": "when Mary and John went to the store , John gave a drink to", "target": "Mary",
     "distractor": "John"},
    {"text": "the cat and the dog", "target": "went", "distractor": "gave"},
    {"text": "one two three four five six", "target": "four", "distractor": "six", "position": 3},
    {"text": "red blue", "target": "red", "distractor": "blue"},
    {"text": "Mary gave the apple to John , then John gave the apple to", "target": "Mary",
     "distractor": "John", "position": 9},
]


@pytest.fixture(scope="module")
def prompts_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("rows") / "p.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    return path


@pytest.fixture(scope="module", params=["gpt2", "qwen2"])
def ckpt(request, tmp_path_factory):
    return save_tiny(request.param, tmp_path_factory.mktemp(request.param))


@pytest.fixture(scope="module")
def model64(ckpt):
    return load_model(ckpt, device="cpu", dtype=torch.float64)


def one_prompt(loaded, row):
    """The prompt alone, unpadded, as a Batch (scored where its JSONL says)."""
    tok = loaded.tokenizer
    ids = tok(row["text"]).input_ids
    t = torch.tensor([ids])
    pos = None if "position" not in row else torch.tensor([row["position"]])
    return ids, Batch(t, torch.ones_like(t), torch.tensor([tok.convert_tokens_to_ids(row["target"])]),
                      torch.tensor([tok.convert_tokens_to_ids(row["distractor"])]), pos)


def run(tmp_path, ckpt, prompts, **kw):
    db = tmp_path / "wh.duckdb"
    opts = PopulateOptions(prompts=str(prompts), model=str(ckpt), target="logit_diff", batch_size=3, **kw)
    return db, populate(db, opts, progress=False).run_id


def test_metric_loss_and_tokens_land_on_their_own_prompt(tmp_path, ckpt, prompts_file):
    import transformers as T

    db, run_id = run(tmp_path, ckpt, prompts_file, scalars=("mlp_post_act",))
    hf = T.AutoModelForCausalLM.from_pretrained(ckpt, attn_implementation="eager").eval()
    loaded = load_model(ckpt, device="cpu")
    wh = Warehouse(db)
    stored = wh.sql("SELECT prompt_id, n_tokens, metric, loss FROM prompts WHERE run_id = $r "
                    "ORDER BY prompt_id", r=run_id)
    assert stored["prompt_id"].to_list() == list(range(len(ROWS)))
    metrics = []
    for row, s in zip(ROWS, stored.iter_rows(named=True)):
        ids, b = one_prompt(loaded, row)
        diff, loss = hf_metric_and_loss(hf, ids, int(b.target_ids), int(b.distractor_ids),
                                        row.get("position"))
        assert s["n_tokens"] == len(ids)
        assert s["metric"] == pytest.approx(diff, abs=1e-4), row
        assert s["loss"] == pytest.approx(loss, abs=1e-4), row
        toks = wh.sql("SELECT token_id FROM tokens WHERE run_id = $r AND prompt_id = $p "
                      "ORDER BY position", r=run_id, p=s["prompt_id"])["token_id"].to_list()
        assert toks == ids
        metrics.append(diff)
    assert len(set(np.round(metrics, 3))) == len(ROWS)  # distinct: a swap could not pass


def test_stored_node_rows_are_the_top_k_at_their_positions(tmp_path, ckpt, model64, prompts_file):
    """Values at stored (position, layer, index) equal autograd's; layer -1 for embeddings; the
    kept nodes are the k largest |value| of their type."""
    k = 5
    db, run_id = run(tmp_path, ckpt, prompts_file, dtype="float64",
                     scalars=("mlp_act_times_grad", "mlp_write_norm", "token_attribution"),
                     select=f"top-k:{k}:mlp_act_times_grad")
    wh = Warehouse(db)
    model = model64.model
    for pid, row in enumerate(ROWS):
        ids, b = one_prompt(model64, row)
        got = wh.sql("SELECT position, layer, node_type::VARCHAR AS node_type, node_index, "
                     "scalar::VARCHAR AS scalar, value, node_label FROM nodes WHERE run_id = $r AND "
                     "prompt_id = $p", r=run_id, p=pid)
        # embeddings: token + position embedding · ∂metric/∂embedding, at layer -1
        e, g = act_and_grad(model, b, "logit_diff", "hook_embed")
        if "hook_pos_embed" in model.hook_points:
            e = e + act_and_grad(model, b, "logit_diff", "hook_pos_embed")[0]
        want = (e * g).sum(-1)[0]  # [pos]
        emb = got.filter(pl.col("scalar") == "token_attribution")
        assert emb.height == min(k, len(ids))
        assert set(emb["layer"]) == {-1} and set(emb["node_label"]) == {"emb"}
        for r in emb.iter_rows(named=True):
            assert r["value"] == pytest.approx(float(want[r["position"]]), rel=1e-5, abs=1e-7)
        kept = set(emb["position"])
        assert min(abs(float(want[p])) for p in kept) >= max(
            [abs(float(want[p])) for p in range(len(ids)) if p not in kept], default=0) - 1e-7
        # neurons: act × grad by autograd; write norm = the norm of the write vector act · W_out[n]
        per_layer = [act_and_grad(model, b, "logit_diff", f"blocks.{L}.mlp.hook_post")
                     for L in range(model.cfg.n_layers)]
        atg = torch.stack([(a * g)[0] for a, g in per_layer])  # [layer, pos, neuron]
        neurons = got.filter(pl.col("scalar") == "mlp_act_times_grad")
        assert neurons.height == k
        keys = set()
        for r in neurons.iter_rows(named=True):
            key = (r["layer"], r["position"], r["node_index"])
            keys.add(key)
            assert r["value"] == pytest.approx(float(atg[key]), rel=1e-5, abs=1e-8), (pid, key)
        rest = atg.abs().flatten().sort(descending=True).values
        assert min(abs(float(atg[key])) for key in keys) >= float(rest[k]) - 1e-9
        norms = got.filter(pl.col("scalar") == "mlp_write_norm")
        assert {(r["layer"], r["position"], r["node_index"]) for r in norms.iter_rows(named=True)} == keys
        for r in norms.iter_rows(named=True):
            a = per_layer[r["layer"]][0][0, r["position"], r["node_index"]]
            write = a * model.blocks[r["layer"]].mlp.W_out[r["node_index"]]
            assert r["value"] == pytest.approx(float(write.norm()), rel=1e-5)


def component_index(model, layer, node_type, index):
    """Position of an upstream node in the component graph's outputs (embed, heads, mlp per layer)."""
    if node_type == "embed":
        return 0
    per_layer = model.cfg.n_heads + 1
    return 1 + layer * per_layer + (index if node_type == "attn_head" else model.cfg.n_heads)


def component_upstream(model, layer, node_type):
    """(layer, type, index) of every component node upstream of a downstream node."""
    cfg = model.cfg
    out = [(-1, "embed", 0)]
    for L in range(cfg.n_layers):
        heads = [(L, "attn_head", h) for h in range(cfg.n_heads)]
        if node_type == "logit" or L < layer:
            out += heads + [(L, "mlp", 0)]
        elif L == layer and node_type == "mlp" and not cfg.parallel:
            out += heads
    return set(out)


def test_per_position_component_edges_are_stored_at_their_positions(tmp_path, ckpt, model64,
                                                                     prompts_file):
    db, run_id = run(tmp_path, ckpt, prompts_file, dtype="float64", scalars=("mlp_post_act",),
                     edges=EdgeOptions(select="dense", positions="each"))
    model = model64.model
    edges = Warehouse(db).sql(
        "SELECT prompt_id, up_layer, up_type::VARCHAR AS up_type, up_index, up_pos, down_layer, "
        "down_type::VARCHAR AS down_type, down_index, down_pos, down_input::VARCHAR AS down_input, "
        "value FROM edges WHERE run_id = $r", r=run_id)
    assert edges["up_pos"].null_count() == 0 and (edges["up_pos"] == edges["down_pos"]).all()
    for pid, row in enumerate(ROWS):
        ids, b = one_prompt(model64, row)
        e = edges.filter(pl.col("prompt_id") == pid)
        assert e["up_pos"].min() == 0 and e["up_pos"].max() == len(ids) - 1
        outs = component_outputs(model, b)
        groups = e.partition_by("down_layer", "down_type", "down_index", "down_input", as_dict=True)
        n_down = model.cfg.n_layers * (model.cfg.n_heads + 2 * model.cfg.n_kv_heads + 1) + 1
        assert len(groups) == n_down
        for (layer, node_type, index, inp), rows in groups.items():
            if node_type == "logit":
                assert index == int(b.target_ids)
            g, _ = component_grad(model, b, "logit_diff", node_type, layer, index, inp)
            ups = component_upstream(model, layer, node_type)
            seen = set()
            for r in rows.iter_rows(named=True):
                u = (r["up_layer"], r["up_type"], r["up_index"])
                assert u in ups, (u, node_type, layer)
                seen.add((u, r["up_pos"]))
                want = outs[component_index(model, *u)][0, r["up_pos"]] @ g[0, r["up_pos"]]
                assert r["value"] == pytest.approx(float(want), rel=1e-5, abs=1e-7)
            assert len(seen) == rows.height == len(ups) * len(ids)  # dense: every pair, every position


def test_node_level_edges_stored_equal_brute_force_and_keep_the_top_k(tmp_path, ckpt, model64,
                                                                       prompts_file):
    k = 4
    db, run_id = run(tmp_path, ckpt, prompts_file, dtype="float64", scalars=("mlp_post_act",),
                     edges=EdgeOptions(select=f"top-k:{k}", into=6, component=False))
    model = model64.model
    edges = Warehouse(db).sql(
        "SELECT prompt_id, up_layer, up_type::VARCHAR AS up_type, up_index, up_pos, down_layer, "
        "down_type::VARCHAR AS down_type, down_index, down_pos, down_input::VARCHAR AS down_input, "
        "value FROM edges WHERE run_id = $r", r=run_id)
    assert edges["up_pos"].null_count() == edges["down_pos"].null_count() == 0
    kinds = set()
    for pid, row in enumerate(ROWS):
        ids, b = one_prompt(model64, row)
        e = edges.filter(pl.col("prompt_id") == pid)
        groups = e.partition_by("down_layer", "down_type", "down_index", "down_pos", "down_input",
                                as_dict=True)
        assert any(key[1] == "logit" for key in groups)  # the target is traced too
        for (layer, node_type, index, pos, inp), rows in groups.items():
            assert 0 <= pos < len(ids)
            if node_type == "logit":
                assert index == int(b.target_ids) and pos == int(b.scored_positions)
            kinds.add(inp or node_type)
            ref, r, _, _ = node_edges_ref(model, b, "logit_diff", node_type, layer, index, pos, 0, inp)
            assert r.abs().max() > 1e-6
            cands = {key: val for key, val in ref.items() if key[3] <= pos}
            got = {(r_["up_type"], r_["up_layer"], r_["up_index"], r_["up_pos"]): r_["value"]
                   for r_ in rows.iter_rows(named=True)}
            assert len(got) == rows.height == min(k, len(cands))
            for key, val in got.items():
                assert val == pytest.approx(cands[key], rel=1e-5, abs=1e-7), (key, node_type, inp)
            dropped = [abs(v) for key, v in cands.items() if key not in got]
            assert min(abs(v) for v in got.values()) >= max(dropped, default=0) - 1e-7
    assert {"q", "k", "v", "logit"} <= kinds or {"mlp_neuron", "logit"} <= kinds
