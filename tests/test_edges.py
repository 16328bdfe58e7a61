"""Component-graph edges against a brute-force autograd reference, one downstream node at a time."""

from __future__ import annotations

import pytest
import torch

from actwh.compute.edges import component_edges
from actwh.compute.loading import load_model
from actwh.compute.targets import TARGETS, Batch

from conftest import PROMPTS, padded_batch
from reference import component_grad, component_outputs, hf_logits

CORRUPT = ["when John and Mary went to the store , Mary gave a ball to",
           "the dog",
           "one two three four five six seven eight nine ten ten nine eight"]


@pytest.fixture(scope="module")
def model64(family_dir):
    return load_model(family_dir[1], device="cpu", dtype=torch.float64)


def make_batch(loaded, texts=PROMPTS):
    tokens, mask = padded_batch(loaded.tokenizer, texts)
    return Batch(tokens, mask, torch.tensor([5, 7, 9]), torch.tensor([6, 8, 10]))


def outputs(model, batch, extra_hooks=()):
    return component_outputs(model, batch, extra_hooks)


def reference_grad(model, batch, target, v, extra_hooks=()):
    return component_grad(model, batch, target, v.node_type, v.layer, v.index, v.down_input,
                          extra_hooks)[0]


def upstream_bias(model, v):
    """Σ attention output biases of the layers upstream of v (an MLP's bias is in its output)."""
    n = model.cfg.n_layers if v.node_type == "logit" else v.layer + (
        v.node_type == "mlp" and not model.cfg.parallel)
    return sum((model.blocks[L].attn.b_O for L in range(n)), torch.zeros_like(model.blocks[0].attn.b_O))


@pytest.mark.parametrize("side", ["right", "left"])
def test_edges_equal_brute_force_and_are_complete(model64, side):
    model = model64.model
    tokens, mask = padded_batch(model64.tokenizer, PROMPTS, side)
    batch = Batch(tokens, mask, torch.tensor([5, 7, 9]), torch.tensor([6, 8, 10]))
    res = component_edges(model, batch, "logit_diff", positions="each")
    summed = component_edges(model, batch, "logit_diff", positions="summed")
    outs = outputs(model, batch)
    for j, v in enumerate(res.down):
        g, x = component_grad(model, batch, "logit_diff", v.node_type, v.layer, v.index, v.down_input)
        total = (upstream_bias(model, v) * g).sum(-1)  # [b, p]
        for i, u in enumerate(res.up):
            if res.allowed[i, j]:
                want = (outs[i] * g).sum(-1)  # [b, p]
                assert torch.allclose(res.values[:, :, i, j], want, atol=1e-4), (u, v)
                assert torch.allclose(summed.values[:, i, j], want.sum(1), atol=1e-4), (u, v)
                total = total + want
            else:
                assert (res.values[:, :, i, j] == 0).all() and (summed.values[:, i, j] == 0).all()
        # Completeness, against the reference's own input: Σ_u score(u -> v) + bias = x_v · g_v.
        x_dot_g = (x * g).sum(-1)
        assert torch.allclose(total, x_dot_g, atol=1e-8)
        assert torch.allclose(res.in_dot_grad[..., j], x_dot_g, atol=1e-8), v
        assert torch.allclose(res.bias[..., j], (upstream_bias(model, v) * g).sum(-1), atol=1e-8), v
    assert res.values.abs().amax((0, 1, 2)).min() > 0  # every downstream node has a non-zero edge


@pytest.mark.parametrize("steps", [0, 3])
def test_corrupt_baseline_and_ig_equal_brute_force(model64, steps):
    model = model64.model
    batch = make_batch(model64)
    corrupt, _ = padded_batch(model64.tokenizer, CORRUPT)
    assert corrupt.shape == batch.tokens.shape
    res = component_edges(model, batch, "logit_diff", corrupt=corrupt, ig_steps=steps)
    bad = Batch(corrupt, batch.mask, batch.target_ids, batch.distractor_ids)
    diffs = [c - k for c, k in zip(outputs(model, batch), outputs(model, bad))]
    embed_names = [n for n in ("hook_embed", "hook_pos_embed") if n in model.hook_points]
    e_clean = model.run_with_cache(batch.tokens, embed_names, attention_mask=batch.mask).acts
    e_bad = model.run_with_cache(corrupt, embed_names, attention_mask=batch.mask).acts
    alphas = [k / steps for k in range(steps)] if steps else [None]
    for j, v in enumerate(res.down):
        grads = []
        for a in alphas:
            hooks = [] if a is None else [
                (n, lambda t, n, a=a: e_bad[n] + a * (e_clean[n] - e_bad[n])) for n in embed_names]
            grads.append(reference_grad(model, batch, "logit_diff", v, hooks))
        g = sum(grads) / len(grads)
        for i in range(len(res.up)):
            if res.allowed[i, j]:
                want = (diffs[i] * g).sum((-1, -2))
                assert torch.allclose(res.values[:, i, j], want, atol=1e-4), (res.up[i], v)
    # The clean and corrupted metrics, from plain forward passes of each prompt alone.
    for b, n in enumerate(batch.mask.sum(1).tolist()):
        for ids, got in ((batch.tokens[b, :n], res.metric[b]), (corrupt[b, :n], res.corrupt_metric[b])):
            with torch.no_grad():
                logits = model(ids[None])[0, -1]
            assert float(got) == pytest.approx(float(logits[5 + 2 * b] - logits[6 + 2 * b]), abs=1e-9)


def test_ig_without_corrupt_is_refused(model64):
    from actwh.errors import ActwhError

    with pytest.raises(ActwhError, match="corrupt"):
        component_edges(model64.model, make_batch(model64), "logit_diff", ig_steps=2)


def test_stored_edges_round_trip_and_selection_count(tmp_path, gpt2_dir):
    import numpy as np

    from actwh.compute.prompts import read_prompts
    from actwh.runner import EdgeOptions, PopulateOptions, encode_all, populate
    from actwh.warehouse import Warehouse

    from conftest import write_prompts

    prompts = write_prompts(tmp_path / "p.jsonl")
    db = tmp_path / "wh.duckdb"
    opts = PopulateOptions(prompts=str(prompts), model=str(gpt2_dir), scalars=("mlp_act_times_grad",),
                           target="logit_diff", batch_size=1, edges=EdgeOptions(select="top-k:9"))
    run = populate(db, opts, progress=False).run_id
    loaded = load_model(gpt2_dir, device="cpu")
    encoded = encode_all(loaded, read_prompts(prompts), TARGETS["logit_diff"], False)
    wh = Warehouse(db)
    for e in encoded:
        ids = torch.tensor([e.ids])
        batch = Batch(ids, torch.ones_like(ids), torch.tensor([e.target]), torch.tensor([e.distractor]))
        res = component_edges(loaded.model, batch, "logit_diff")
        got = wh.sql("SELECT up_layer, up_type::VARCHAR AS up_type, up_index, down_layer, "
                     "down_type::VARCHAR AS down_type, down_index, down_input::VARCHAR AS down_input, "
                     "up_pos, value FROM edges WHERE run_id = $r AND prompt_id = $p", r=run, p=e.prompt_id)
        assert got.height == 9 and got["up_pos"].null_count() == 9
        index = {(n.layer, n.node_type, n.index): i for i, n in enumerate(res.up)}
        down = {(n.layer, n.node_type, n.index, n.down_input): j for j, n in enumerate(res.down)}
        for r in got.iter_rows(named=True):
            i = index[(r["up_layer"], r["up_type"], r["up_index"])]
            d_index = 0 if r["down_type"] == "logit" else r["down_index"]
            if r["down_type"] == "logit":
                assert r["down_index"] == e.target
            j = down[(r["down_layer"], r["down_type"], d_index, r["down_input"])]
            assert np.float32(r["value"]) == np.float32(res.values[0, i, j].item())
        # the nine kept are the nine largest |value| among upstream pairs
        cand = res.values[0][res.allowed].abs().sort(descending=True).values
        assert np.isclose(min(abs(got["value"])), cand[8].item(), rtol=1e-6)


def ig_grad(model, batch, corrupt, steps, v):
    """The mean brute-force gradient at v over the EAP-IG path's embeddings."""
    names = [n for n in ("hook_embed", "hook_pos_embed") if n in model.hook_points]
    e_clean = model.run_with_cache(batch.tokens, names, attention_mask=batch.mask).acts
    e_bad = model.run_with_cache(corrupt, names, attention_mask=batch.mask).acts
    grads = []
    for a in [k / steps for k in range(steps)] if steps else [None]:
        hooks = [] if a is None else [
            (n, lambda t, n, a=a: e_bad[n] + a * (e_clean[n] - e_bad[n])) for n in names]
        grads.append(reference_grad(model, batch, "logit_diff", v, hooks))
    return sum(grads) / len(grads)


def test_bfloat16_populate_with_edges_tracks_brute_force(tmp_path, gpt2_dir):
    """Reduced precision runs end to end (norm pull-backs are float32 inside) and its stored
    metrics and edges stay close to `transformers`' metric and float64 brute-force edges."""
    import transformers as T

    from actwh.compute.edges import Node, upstream_nodes
    from actwh.runner import EdgeOptions, PopulateOptions, populate
    from actwh.warehouse import Warehouse

    from conftest import IOI_ROWS, write_prompts

    prompts = write_prompts(tmp_path / "p.jsonl", IOI_ROWS[2:])  # 4 prompts of 5 to 14 tokens
    opts = PopulateOptions(prompts=str(prompts), model=str(gpt2_dir), scalars=("mlp_act_times_grad",),
                           target="logit_diff", dtype="bfloat16", edges=EdgeOptions(select="top-k:40"))
    run = populate(tmp_path / "wh.duckdb", opts, progress=False).run_id
    wh = Warehouse(tmp_path / "wh.duckdb")
    hf = T.AutoModelForCausalLM.from_pretrained(gpt2_dir, attn_implementation="eager").eval()
    loaded = load_model(gpt2_dir, device="cpu", dtype=torch.float64)
    tok = loaded.tokenizer
    edges = wh.sql("SELECT prompt_id, up_layer, up_type::VARCHAR AS up_type, up_index, down_layer, "
                   "down_type::VARCHAR AS down_type, down_index, down_input::VARCHAR AS down_input, "
                   "value FROM edges WHERE run_id = $r", r=run)
    up_index = {(n.layer, n.node_type, n.index): i for i, n in enumerate(upstream_nodes(loaded.model))}
    for pid, row in enumerate(IOI_ROWS[2:]):
        ids = tok(row["text"]).input_ids
        t, d = tok.convert_tokens_to_ids(row["target"]), tok.convert_tokens_to_ids(row["distractor"])
        stored = wh.sql("SELECT metric FROM prompts WHERE run_id = $r AND prompt_id = $p", r=run, p=pid)
        logits = hf_logits(hf, ids)[-1]
        want = float(logits[t] - logits[d])
        assert stored["metric"][0] == pytest.approx(want, abs=0.05 * max(1.0, abs(want)))
        batch = Batch(torch.tensor([ids]), torch.ones(1, len(ids), dtype=torch.long),
                      torch.tensor([t]), torch.tensor([d]))
        outs = outputs(loaded.model, batch)
        e = edges.filter(edges["prompt_id"] == pid)
        assert e.height == 40
        grads, got, ref = {}, [], []
        for r in e.iter_rows(named=True):
            v = Node(r["down_layer"], r["down_type"], 0 if r["down_type"] == "logit" else r["down_index"],
                     r["down_input"])
            if v not in grads:
                grads[v] = reference_grad(loaded.model, batch, "logit_diff", v)
            u = up_index[(r["up_layer"], r["up_type"], r["up_index"])]
            got.append(r["value"])
            ref.append(float((outs[u] * grads[v]).sum()))
        got, ref = torch.tensor(got), torch.tensor(ref)
        assert (got - ref).abs().max() <= 0.05 * ref.abs().max()


def test_run_reports_edges_into_target_beside_corrupt_metric(tmp_path, gpt2_dir):
    from actwh.compute.edges import Node
    from actwh.compute.prompts import read_prompts
    from actwh.runner import EdgeOptions, PopulateOptions, encode_all, populate
    from actwh.warehouse import Warehouse

    from conftest import IOI_ROWS, write_prompts

    prompts = write_prompts(tmp_path / "p.jsonl", IOI_ROWS[:2])
    db = tmp_path / "wh.duckdb"
    opts = PopulateOptions(prompts=str(prompts), model=str(gpt2_dir), scalars=("mlp_act_times_grad",),
                           target="logit_diff", batch_size=1,
                           edges=EdgeOptions(baseline="corrupt", ig_steps=2, select="top-k:3"))
    run = populate(db, opts, progress=False).run_id
    stored = Warehouse(db).sql("SELECT prompt_id, metric, corrupt_metric, edges_to_target FROM prompts "
                               "WHERE run_id = $r ORDER BY prompt_id", r=run)
    loaded = load_model(gpt2_dir, device="cpu", dtype=torch.float64)
    model = loaded.model
    logit = Node(model.cfg.n_layers, "logit", 0)
    for e, row in zip(encode_all(loaded, read_prompts(prompts), TARGETS["logit_diff"], False, True),
                      stored.iter_rows(named=True)):
        ids, bad = torch.tensor([e.ids]), torch.tensor([e.corrupt])
        batch = Batch(ids, torch.ones_like(ids), torch.tensor([e.target]), torch.tensor([e.distractor]))
        with torch.no_grad():
            want_bad = TARGETS["logit_diff"].metric(model(bad), batch)[0]
            want = TARGETS["logit_diff"].metric(model(ids), batch)[0]
        bad_batch = Batch(bad, batch.mask, batch.target_ids, batch.distractor_ids)
        diffs = [c - k for c, k in zip(outputs(model, batch), outputs(model, bad_batch))]
        g = ig_grad(model, batch, bad, 2, logit)
        into = sum(float((d * g).sum()) for d in diffs)  # every upstream node feeds the target
        assert row["corrupt_metric"] == pytest.approx(float(want_bad), abs=1e-4)
        assert row["metric"] == pytest.approx(float(want), abs=1e-4)
        assert row["edges_to_target"] == pytest.approx(into, abs=1e-4)
        assert abs(into) > 1e-3


def test_mixture_of_experts_populates_expert_nodes_and_edges(tmp_path):
    """A mixture-of-experts checkpoint end to end: expert scalars and component edges from
    experts are stored as `mlp_expert` rows equal to the tensors they came from."""
    import numpy as np

    from actwh.compute.prompts import read_prompts
    from actwh.compute.scalars import compute_scalars
    from actwh.runner import EdgeOptions, PopulateOptions, encode_all, populate
    from actwh.warehouse import Warehouse

    from conftest import IOI_ROWS, save_tiny, write_prompts

    folder = save_tiny("qwen2_moe", tmp_path / "moe")
    prompts = write_prompts(tmp_path / "p.jsonl", IOI_ROWS[:2])
    db = tmp_path / "wh.duckdb"
    opts = PopulateOptions(prompts=str(prompts), model=str(folder), batch_size=1, target="logit_diff",
                           scalars=("expert_act_times_grad", "router_prob"), select="dense",
                           edges=EdgeOptions(select="dense"))
    run = populate(db, opts, progress=False).run_id
    wh = Warehouse(db)
    loaded = load_model(folder, device="cpu")
    cfg = loaded.model.cfg
    for e in encode_all(loaded, read_prompts(prompts), TARGETS["logit_diff"], False):
        ids = torch.tensor([e.ids])
        batch = Batch(ids, torch.ones_like(ids), torch.tensor([e.target]), torch.tensor([e.distractor]))
        res = compute_scalars(loaded.model, batch, "logit_diff", ["expert_act_times_grad", "router_prob"])
        rows = wh.sql("SELECT scalar::VARCHAR AS scalar, position, layer, node_index, value FROM node_scalars "
                      "WHERE run_id = $r AND prompt_id = $p AND node_type = 'mlp_expert'", r=run, p=e.prompt_id)
        n_nodes = cfg.n_experts + 1  # the shared expert is the last index
        assert rows.height == 2 * len(e.ids) * cfg.n_layers * n_nodes
        for r in rows.iter_rows(named=True):
            want = res.token[r["scalar"]][0, r["position"], r["layer"], r["node_index"]]
            assert np.float32(r["value"]) == np.float32(want.item())
        edges = component_edges(loaded.model, batch, "logit_diff")
        got = wh.sql("SELECT up_layer, up_index, down_layer, down_type::VARCHAR AS down_type, down_index, "
                     "down_input::VARCHAR AS down_input, value FROM edges WHERE run_id = $r AND prompt_id = $p "
                     "AND up_type = 'mlp_expert'", r=run, p=e.prompt_id)
        assert got.height > 0 and set(got["up_index"]) == set(range(n_nodes))
        up = {(n.layer, n.index): i for i, n in enumerate(edges.up) if n.node_type == "mlp_expert"}
        down = {(n.layer, n.node_type, n.index, n.down_input): j for j, n in enumerate(edges.down)}
        for r in got.iter_rows(named=True):
            j = down[(r["down_layer"], r["down_type"], 0 if r["down_type"] == "logit" else r["down_index"],
                      r["down_input"])]
            assert np.float32(r["value"]) == np.float32(edges.values[0, up[(r["up_layer"], r["up_index"])], j].item())
