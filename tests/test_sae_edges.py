"""Transcoders, and edges into and out of autoencoder latents, against autograd references."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner

from actwh.cli.main import cli
from actwh.compute.loading import load_model
from actwh.compute.node_edges import Down, node_edges, sites, target_downs, top_downstream
from actwh.compute.sae import at, load_sae, splice
from actwh.compute.targets import TARGETS, Batch
from actwh.errors import SAEError

from conftest import PROMPTS, padded_batch, post_gain, write_prompts
from test_sae import write_random_weights, write_saelens


def write_transcoder(folder, d, d_sae, layer, arch="transcoder", seed=0, **extra):
    """A transcoder in SAELens 6's layout: reads blocks.L.ln2.hook_normalized, writes hook_mlp_out."""
    w = write_random_weights(folder, d, d_sae, seed, jumprelu=arch == "jumprelu_transcoder")
    cfg = {"d_in": d, "d_sae": d_sae, "d_out": d, "architecture": arch, "apply_b_dec_to_input": False,
           "metadata": {"hook_name": f"blocks.{layer}.ln2.hook_normalized",
                        "hook_name_out": f"blocks.{layer}.hook_mlp_out"}, **extra}
    (folder / "cfg.json").write_text(json.dumps(cfg))
    return folder, w


SETUPS = {
    # a residual SAE after layer 0, a transcoder in layer 1: latent → latent across layers
    "resid+transcoder": lambda tmp, d: [
        write_saelens(tmp / "r0", d, 24, "blocks.0.hook_resid_post", arch="jumprelu")[0],
        write_transcoder(tmp / "t1", d, 24, 1, arch="topk_transcoder", seed=1,
                         activation_fn_kwargs={"k": 6})[0]],
    # a transcoder in layer 0, an SAE on layer 1's attention output: head → latent
    "transcoder+attn_out": lambda tmp, d: [
        write_transcoder(tmp / "t0", d, 24, 0, seed=2)[0],
        write_saelens(tmp / "a1", d, 24, "blocks.1.hook_attn_out", seed=3)[0]],
}


@pytest.fixture(params=list(SETUPS))
def spliced_model(request, family_dir, tmp_path):
    loaded = load_model(family_dir[1], device="cpu", dtype=torch.float64)
    tokens, mask = padded_batch(loaded.tokenizer, PROMPTS)
    with torch.no_grad():
        before = loaded.model(tokens, mask)
    for folder in SETUPS[request.param](tmp_path, loaded.model.cfg.d_model):
        splice(loaded.model, load_sae(folder))
    batch = Batch(tokens, mask, torch.tensor([5, 7, 9]), torch.tensor([6, 8, 10]))
    return loaded.model, batch, before


def reference_r(model, batch, v: Down, g_fixed) -> tuple[torch.Tensor, torch.Tensor]:
    """∂(act_v · g_fixed)/∂(v's private copy of its input) by autograd through the real modules,
    and that input: captured from a forward pass and re-encoded (through ln2 for a transcoder)."""
    grabbed = {}
    if v.node_type == "logit":
        site = f"blocks.{model.cfg.n_layers - 1}.hook_resid_post"

        def swap(t, name):
            grabbed["x"] = t.detach().clone().requires_grad_(True)
            return grabbed["x"]
        with torch.enable_grad(), model.hooks(fwd=[(site, swap)]):
            metric = TARGETS["logit_diff"].metric(model(batch.tokens, batch.mask), batch).sum()
            (g,) = torch.autograd.grad(metric, [grabbed["x"]])
        return g, grabbed["x"].detach()
    sae = at(model, v.layer)
    if sae.info.kind == "transcoder":
        src = f"blocks.{v.layer}.hook_resid_{'pre' if model.cfg.parallel else 'mid'}"
        with torch.no_grad(), model.hooks(fwd=[(src, lambda t, n: grabbed.__setitem__("x", t))]):
            model(batch.tokens, batch.mask)
    else:
        handle = sae.register_forward_pre_hook(lambda m, args: grabbed.__setitem__("x", args[0]))
        try:
            with torch.no_grad():
                model(batch.tokens, batch.mask)
        finally:
            handle.remove()
    x = grabbed["x"].detach().clone().requires_grad_(True)
    with torch.enable_grad():
        inp = model.blocks[v.layer].ln2(x) if sae.info.kind == "transcoder" else x
        act = sae.encode(inp)[v.batch_index, v.pos, v.index]
        (g,) = torch.autograd.grad(act * g_fixed, [x])
    return g, x.detach()


def test_transcoder_splice_is_exact_and_latents_match_weights(family_dir, tmp_path):
    loaded = load_model(family_dir[1], device="cpu", dtype=torch.float64)
    model = loaded.model
    tokens, mask = padded_batch(loaded.tokenizer, PROMPTS)
    raw = model.run_with_cache(tokens, ["blocks.1.hook_resid_pre", "blocks.1.hook_resid_mid",
                                        "blocks.1.hook_mlp_out"], attention_mask=mask)
    folder, w = write_transcoder(tmp_path / "t", model.cfg.d_model, 16, 1, arch="jumprelu_transcoder")
    splice(model, load_sae(folder))
    cache = model.run_with_cache(tokens, ["blocks.1.transcoder.hook_latents",
                                          "blocks.1.transcoder.hook_error"], attention_mask=mask)
    assert (cache.logits - raw.logits).abs().max() <= 1e-10
    blk = model.blocks[1]
    mlp_in = blk.ln2(raw.acts["blocks.1.hook_resid_" + ("pre" if model.cfg.parallel else "mid")])
    pre = mlp_in @ w["W_enc"].double() + w["b_enc"].double()
    by_hand = torch.where(pre > w["threshold"].double(), pre.relu(), torch.zeros_like(pre))
    assert torch.allclose(cache.acts["blocks.1.transcoder.hook_latents"], by_hand, atol=1e-12)
    recon = by_hand @ w["W_dec"].double() + w["b_dec"].double()
    assert torch.allclose(cache.acts["blocks.1.transcoder.hook_error"],
                          raw.acts["blocks.1.hook_mlp_out"] - recon, atol=1e-12)
    with pytest.raises(SAEError, match="one per layer"):
        splice(model, load_sae(write_saelens(tmp_path / "s", model.cfg.d_model, 8,
                                             "blocks.1.hook_resid_pre")[0]))


def test_edges_into_latents_and_target_equal_autograd_and_sum_exactly(spliced_model):
    model, batch, before = spliced_model
    fwd, bwd = sites(model)
    cache = model.run_with_cache(batch.tokens, fwd, attention_mask=batch.mask, grad_names=bwd,
                                 backward_of=lambda l: TARGETS["logit_diff"].metric(l, batch).sum())
    assert (cache.logits - before).abs().max() <= 1e-10  # both autoencoders spliced, exactly
    downs = [d for d in top_downstream(model, batch, cache, 60) if d.node_type == "sae_latent"]
    downs += target_downs(model, batch, TARGETS["logit_diff"], cache.logits)
    layers = {d.layer for d in downs if d.node_type == "sae_latent"}
    assert layers == {0, 1} and any(d.node_type == "logit" for d in downs)
    checked = {"latent->latent": 0, "head->latent": 0, "latent->target": 0}
    for res in node_edges(model, batch, "logit_diff", downs, cache=cache):
        v, b, p = res.down, res.down.batch_index, res.down.pos
        g_fixed = None
        if v.node_type == "sae_latent":
            g_fixed = cache.grads[at(model, v.layer).info.prefix + ".hook_latents"][b, p, v.index]
        ref, x = reference_r(model, batch, v, g_fixed)
        assert ref[b, p].abs().max() > 1e-6, v  # the target depends on v
        assert torch.allclose(res.r, ref[b, p], atol=1e-10), v
        off = ref[b].clone()
        off[p] = 0
        assert off.abs().max() < 1e-12  # only v's own position is read
        # Completeness against the reference's own input: Σ_u edge(u -> v) + bias = r · x_v.
        assert torch.isclose(res.total() + res.bias, x[b, p] @ ref[b, p], atol=1e-10), v
        assert torch.isclose(res.r_dot_in, x[b, p] @ ref[b, p], atol=1e-10), v
        # Edges against writes rebuilt from the cache, independently of the module's layout.
        for part in res.parts:
            if part.node_type == "sae_latent":
                up = at(model, part.layer)
                for i, value in zip(part.index.tolist(), part.values):
                    a = cache.acts[up.info.prefix + ".hook_latents"][b, p, i]
                    assert a != 0  # only active latents are upstream candidates
                    assert torch.isclose(value, (a * up.W_dec[i]) @ ref[b, p], atol=1e-12)
                    key = "latent->target" if v.node_type == "logit" else "latent->latent"
                    checked[key] += part.layer < v.layer or v.node_type == "logit"
            if part.node_type == "sae_error":
                err = cache.acts[at(model, part.layer).info.prefix + ".hook_error"][b, p]
                assert torch.isclose(part.values[0], err @ ref[b, p], atol=1e-12)
            if part.node_type == "attn_head" and v.node_type == "sae_latent":
                m, kv_group = part.layer, model.cfg.n_heads // model.cfg.n_kv_heads
                h, k = 1, 0
                write = cache.acts[f"blocks.{m}.attn.hook_pattern"][b, h, p, k] * (
                    cache.acts[f"blocks.{m}.attn.hook_v"][b, k, h // kv_group] @ model.blocks[m].attn.W_O[h])
                if model.cfg.post_norm:  # through the post-norm at the query, scale frozen
                    write = write * post_gain(model, cache.acts, m, "ln1_post")[b, p]
                got = part.values[(part.index == h) & (part.pos == k)][0]
                assert torch.isclose(got, write @ ref[b, p], atol=1e-12)
                checked["head->latent"] += 1
    assert checked["head->latent"] and checked["latent->target"]
    if at(model, 0).info.site.endswith("hook_resid_post"):
        assert checked["latent->latent"]  # the transcoder in layer 1 reads the SAE's latents


def test_populate_traces_every_active_latent(tmp_path, gpt2_dir):
    from actwh.warehouse import Warehouse

    r0, _ = write_saelens(tmp_path / "r0", 32, 16, "blocks.0.hook_resid_post", arch="jumprelu")
    t1, _ = write_transcoder(tmp_path / "t1", 32, 16, 1, seed=1)
    prompts = write_prompts(tmp_path / "p.jsonl")
    db = tmp_path / "wh.duckdb"
    r = CliRunner().invoke(cli, ["populate", str(prompts), "--model", str(gpt2_dir), "--db", str(db),
                                 "--sae", str(r0), "--sae", str(t1), "--top", "0", "--select", "dense",
                                 "--scalars", "sae_latent_act", "--edges-into", "latents",
                                 "--edges-select", "dense"])
    assert r.exit_code == 0, r.output
    wh = Warehouse(db)
    kinds = wh.sql("SELECT site, json_extract_string(config, '$.kind') AS kind FROM saes ORDER BY site")
    assert kinds.rows() == [("blocks.0.hook_resid_post", "sae"), ("blocks.1.ln2.hook_normalized", "transcoder")]
    active = wh.sql("SELECT prompt_id, layer, node_index, position FROM node_scalars "
                    "WHERE scalar = 'sae_latent_act' ORDER BY ALL")
    traced = wh.sql("SELECT DISTINCT prompt_id, down_layer, down_index, down_pos FROM edges "
                    "WHERE down_type = 'sae_latent' ORDER BY ALL")
    assert active.height > 0 and active.rows() == traced.rows()
    pairs = {row[:2] for row in wh.sql("SELECT DISTINCT up_type::VARCHAR, down_type::VARCHAR, up_layer, "
                                       "down_layer FROM edges").rows()}
    assert {("sae_latent", "sae_latent"), ("attn_head", "sae_latent"), ("sae_latent", "logit"),
            ("sae_error", "logit")} <= pairs
    # The residual SAE after layer 0 hides everything before it; the transcoder replaces MLP 1.
    assert not wh.sql("SELECT 1 FROM edges WHERE down_layer = 1 AND up_layer < 0 "
                      "OR up_type = 'mlp_neuron' AND down_type = 'logit'").height
