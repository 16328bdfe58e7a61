"""Component-graph edges against a brute-force autograd reference, one downstream node at a time."""

from __future__ import annotations

import pytest
import torch

from actwh.compute.edges import component_edges
from actwh.compute.loading import load_model
from actwh.compute.targets import TARGETS, Batch

from conftest import PROMPTS, padded_batch

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
    """Upstream writes, computed directly: embed (+pos), z_h W_O_h per head, MLP outputs."""
    names = ["hook_embed"] + (["hook_pos_embed"] if "hook_pos_embed" in model.hook_points else [])
    names += [f"blocks.{L}.{s}" for L in range(model.cfg.n_layers) for s in ("attn.hook_z", "hook_mlp_out")]
    acts = model.run_with_cache(batch.tokens, names, attention_mask=batch.mask,
                                fwd_hooks=extra_hooks).acts
    outs = [acts["hook_embed"] + acts.get("hook_pos_embed", 0)]
    for L, blk in enumerate(model.blocks):
        for h in range(model.cfg.n_heads):
            outs.append(acts[f"blocks.{L}.attn.hook_z"][:, :, h] @ blk.attn.W_O[h])
        outs.append(acts[f"blocks.{L}.hook_mlp_out"])
    return outs


def reference_grad(model, batch, target, v, extra_hooks=()):
    """∂metric/∂in_v where only v reads a private copy of the residual stream. [b, p, d]"""
    cfg = model.cfg
    copy = {}

    def grab(t, name):
        copy["x"] = t.detach().clone().requires_grad_(True)

    hooks = list(extra_hooks)
    if v.node_type == "attn_head":
        blk = model.blocks[v.layer]
        W = {"q": blk.attn.W_Q, "k": blk.attn.W_K, "v": blk.attn.W_V}[v.down_input]
        b = {"q": blk.attn.b_Q, "k": blk.attn.b_K, "v": blk.attn.b_V}[v.down_input]

        def swap(t, name):
            t = t.clone()
            t[:, :, v.index] = blk.ln1(copy["x"]) @ W[v.index] + b[v.index]
            return t
        hooks += [(f"blocks.{v.layer}.hook_resid_pre", grab),
                  (f"blocks.{v.layer}.attn.hook_{v.down_input}", swap)]
    elif v.node_type == "mlp":
        blk = model.blocks[v.layer]
        src = "hook_resid_pre" if cfg.parallel else "hook_resid_mid"
        hooks += [(f"blocks.{v.layer}.{src}", grab),
                  (f"blocks.{v.layer}.mlp.hook_pre",
                   lambda t, n: blk.ln2(copy["x"]) @ blk.mlp.W_in + blk.mlp.b_in)]
        if cfg.gated_mlp:
            hooks.append((f"blocks.{v.layer}.mlp.hook_pre_linear",
                          lambda t, n: blk.ln2(copy["x"]) @ blk.mlp.W_up + blk.mlp.b_up))
    else:
        def keep(t, name):
            copy["x"] = t
        hooks.append((f"blocks.{cfg.n_layers - 1}.hook_resid_post", keep))
    with torch.enable_grad(), model.hooks(fwd=hooks):
        logits = model(batch.tokens, batch.mask)
        (g,) = torch.autograd.grad(TARGETS[target].metric(logits, batch).sum(), [copy["x"]])
    return g * batch.mask[..., None]


def test_edges_equal_brute_force_and_are_complete(model64):
    model = model64.model
    batch = make_batch(model64)
    res = component_edges(model, batch, "logit_diff", positions="each")
    outs = outputs(model, batch)
    for j, v in enumerate(res.down):
        g = reference_grad(model, batch, "logit_diff", v)
        for i, u in enumerate(res.up):
            if res.allowed[i, j]:
                want = (outs[i] * g).sum(-1)  # [b, p]
                assert torch.allclose(res.values[:, :, i, j], want, atol=1e-4), (u, v)
            else:
                assert (res.values[:, :, i, j] == 0).all()
    # Completeness: Σ_u score(u -> v) + bias terms = in_v · ∂metric/∂in_v, at every position.
    total = res.values.sum(2) + res.bias
    assert torch.allclose(total, res.in_dot_grad, atol=1e-8)
    summed = component_edges(model, batch, "logit_diff", positions="summed")
    assert torch.allclose(summed.values, res.values.sum(1), atol=1e-10)


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
    # What the linearisation claims for the target vs the true clean - corrupt difference.
    into_target = res.values[:, :, -1].sum(1)
    assert into_target.shape == res.metric.shape == res.corrupt_metric.shape


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


def test_bfloat16_populate_with_edges_tracks_float32(tmp_path, gpt2_dir):
    """Reduced precision runs end to end (norm pull-backs are float32 inside) and stays close."""
    from actwh.runner import EdgeOptions, PopulateOptions, populate
    from actwh.warehouse import Warehouse

    from conftest import write_prompts

    prompts = write_prompts(tmp_path / "p.jsonl")
    runs = {}
    for dtype in ("float32", "bfloat16"):
        opts = PopulateOptions(prompts=str(prompts), model=str(gpt2_dir), scalars=("mlp_act_times_grad",),
                               target="logit_diff", dtype=dtype, edges=EdgeOptions(select="dense", into=2))
        runs[dtype] = populate(tmp_path / "wh.duckdb", opts, progress=False).run_id
    wh = Warehouse(tmp_path / "wh.duckdb")
    m = wh.sql("SELECT a.metric AS f32, b.metric AS bf16 FROM prompts a JOIN prompts b USING (prompt_id) "
               "WHERE a.run_id = $a AND b.run_id = $b", a=runs["float32"], b=runs["bfloat16"])
    assert m.height == 6
    assert (m["f32"] - m["bf16"]).abs().max() <= 0.1 * max(1.0, m["f32"].abs().max())
    e = wh.sql("SELECT a.value AS f32, b.value AS bf16 FROM edges a JOIN edges b USING (prompt_id, up_layer, "
               "up_type, up_index, down_layer, down_type, down_index, down_input) WHERE a.run_id = $a AND "
               "b.run_id = $b AND a.up_pos IS NULL AND b.up_pos IS NULL", a=runs["float32"], b=runs["bfloat16"])
    assert e.height > 0
    scale = e["f32"].abs().max()
    assert (e["f32"] - e["bf16"]).abs().max() <= 0.1 * scale


def test_run_reports_edges_into_target_beside_corrupt_metric(tmp_path, gpt2_dir):
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
    loaded = load_model(gpt2_dir, device="cpu")
    for e, row in zip(encode_all(loaded, read_prompts(prompts), TARGETS["logit_diff"], False, True),
                      stored.iter_rows(named=True)):
        ids, bad = torch.tensor([e.ids]), torch.tensor([e.corrupt])
        batch = Batch(ids, torch.ones_like(ids), torch.tensor([e.target]), torch.tensor([e.distractor]))
        with torch.no_grad():
            want_bad = TARGETS["logit_diff"].metric(loaded.model(bad), batch)[0]
        res = component_edges(loaded.model, batch, "logit_diff", corrupt=bad, ig_steps=2)
        assert row["corrupt_metric"] == pytest.approx(float(want_bad), abs=1e-4)
        assert row["edges_to_target"] == pytest.approx(float(res.values[0, :, -1].sum()), abs=1e-4)
        assert row["metric"] == pytest.approx(float(res.metric[0]), abs=1e-4)
