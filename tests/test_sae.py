"""Sparse autoencoders: exact splicing, latents from the weights, attributions, file layouts, errors."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import save_file

from actwh.cli.main import cli
from actwh.compute.loading import load_model
from actwh.compute.sae import load_sae, splice
from actwh.compute.scalars import Ctx, compute_scalars
from actwh.compute.targets import TARGETS, Batch
from actwh.errors import SAEError

from conftest import PROMPTS, direct_effect_sites, padded_batch, post_gain, softcap_t, write_prompts


def write_random_weights(folder, d_in, d_sae, seed=0, jumprelu=False):
    """sae_weights.safetensors with seeded random encoder/decoder (and JumpReLU thresholds)."""
    g = torch.Generator().manual_seed(seed)
    w = {"W_enc": torch.randn(d_in, d_sae, generator=g) * 0.3, "b_enc": torch.randn(d_sae, generator=g) * 0.1,
         "W_dec": torch.randn(d_sae, d_in, generator=g) * 0.3, "b_dec": torch.randn(d_in, generator=g) * 0.1}
    if jumprelu:
        w["threshold"] = torch.rand(d_sae, generator=g) * 0.2
    folder.mkdir(parents=True, exist_ok=True)
    save_file(w, folder / "sae_weights.safetensors")
    return w


def write_saelens(folder, d_in, d_sae, site, arch="standard", seed=0, new_layout=True, **extra):
    """A folder in SAELens' documented layout (cfg.json + sae_weights.safetensors)."""
    w = write_random_weights(folder, d_in, d_sae, seed, jumprelu=arch == "jumprelu")
    cfg = {"d_in": d_in, "d_sae": d_sae, "architecture": arch, "apply_b_dec_to_input": True, **extra}
    if new_layout:
        cfg["metadata"] = {"hook_name": site}
    else:
        cfg["hook_name"] = site
    (folder / "cfg.json").write_text(json.dumps(cfg))
    return folder, w


@pytest.fixture
def setup(family_dir, tmp_path):
    loaded = load_model(family_dir[1], device="cpu", dtype=torch.float64)
    d = loaded.model.cfg.d_model
    a, wa = write_saelens(tmp_path / "a", d, 24, "blocks.0.hook_mlp_out")
    b, wb = write_saelens(tmp_path / "b", d, 24, "blocks.1.hook_attn_out", arch="topk", seed=1,
                          new_layout=False, activation_fn_kwargs={"k": 5})
    return loaded, (a, wa), (b, wb)


def test_splicing_leaves_logits_unchanged_and_latents_match_weights(setup):
    loaded, (a, wa), (b, wb) = setup
    model = loaded.model
    tokens, mask = padded_batch(loaded.tokenizer, PROMPTS)
    with torch.no_grad():
        before = model(tokens, mask)
        raw = model.run_with_cache(tokens, ["blocks.0.hook_mlp_out", "blocks.1.hook_attn_out"],
                                   attention_mask=mask).acts
    splice(model, load_sae(a))
    splice(model, load_sae(b))
    cache = model.run_with_cache(tokens, ["blocks.0.hook_mlp_out.sae.hook_latents",
                                          "blocks.1.hook_attn_out.sae.hook_latents",
                                          "blocks.0.hook_mlp_out.sae.hook_error"], attention_mask=mask)
    assert (cache.logits - before).abs().max() <= 1e-5
    x = raw["blocks.0.hook_mlp_out"]
    by_hand = torch.relu((x - wa["b_dec"].double()) @ wa["W_enc"].double() + wa["b_enc"].double())
    assert torch.allclose(cache.acts["blocks.0.hook_mlp_out.sae.hook_latents"], by_hand, atol=1e-10)
    pre = (raw["blocks.1.hook_attn_out"] - wb["b_dec"].double()) @ wb["W_enc"].double() + wb["b_enc"].double()
    kth = pre.topk(5, dim=-1).values[..., -1:]
    topk = torch.where(pre >= kth, pre.relu(), torch.zeros_like(pre))
    assert torch.allclose(cache.acts["blocks.1.hook_attn_out.sae.hook_latents"], topk, atol=1e-10)
    recon = by_hand @ wa["W_dec"].double() + wa["b_dec"].double()
    assert torch.allclose(cache.acts["blocks.0.hook_mlp_out.sae.hook_error"], x - recon, atol=1e-10)


def test_direct_effects_with_latents_sum_to_metric_and_act_times_grad_matches_fd(setup):
    loaded, (a, _), (b, _) = setup
    model = loaded.model
    splice(model, load_sae(a))
    tokens, mask = padded_batch(loaded.tokenizer, PROMPTS)
    batch = Batch(tokens, mask, torch.tensor([5, 7, 9]), torch.tensor([6, 8, 10]))
    res = compute_scalars(model, batch, "logit_diff", ["sae_direct_effect", "sae_act_times_grad",
                                                       "embed_direct_effect", "attn_direct_effect",
                                                       "mlp_layer_direct_effect", "sae_latent_act"])
    site = "blocks.0.hook_mlp_out"
    cache = model.run_with_cache(tokens, [*direct_effect_sites(model), site + ".sae.hook_error"],
                                 attention_mask=mask)
    g = Ctx(model, batch, TARGETS["logit_diff"], cache).g_final() * mask[..., None]
    sae = model.hook_points[site].sae
    # layer 0's MLP output = latents' writes + error + b_dec; every other component as before
    total = res.token["embed_direct_effect"].sum((1, 2, 3)) + res.token["attn_direct_effect"].sum((1, 2, 3))
    total += res.token["mlp_layer_direct_effect"][:, :, 1:].sum((1, 2, 3))
    total += res.token["sae_direct_effect"].sum((1, 2, 3))
    total += (cache.acts[site + ".sae.hook_error"] * g).sum((1, 2)) + (g @ sae.b_dec).sum(-1)
    for L, blk in enumerate(model.blocks):
        total += ((g * post_gain(model, cache.acts, L, "ln1_post")) @ blk.attn.b_O).sum(-1)
    r = TARGETS["logit_diff"].readout(cache.logits, batch)
    t = softcap_t(model, cache.acts, r)
    total = total.index_add(0, r.batch, r.weight * t * (model.ln_final.b @ model.W_U + model.b_U)[r.vocab]) + r.constant
    assert (total - res.metric).abs().max() <= 1e-3
    # act × grad of the most attributed latent vs a central finite difference of scaling it
    atg = res.token["sae_act_times_grad"][0, :, 0]
    p, i = divmod(int(atg.abs().argmax()), atg.shape[1])

    def run(scale):
        def hook(t, name):
            t = t.clone()
            t[0, p, i] *= scale
            return t
        with torch.no_grad(), model.hooks(fwd=[(site + ".sae.hook_latents", hook)]):
            return TARGETS["logit_diff"].metric(model(tokens, mask), batch)[0]
    fd = (run(1 + 1e-4) - run(1 - 1e-4)) / 2e-4
    assert abs(float(atg[p, i]) - float(fd)) <= max(1e-5, 0.01 * abs(float(fd)))


def test_openai_layout_loads(tmp_path, setup):
    loaded, _, _ = setup
    d = loaded.model.cfg.d_model
    g = torch.Generator().manual_seed(3)
    state = {"pre_bias": torch.randn(d, generator=g), "latent_bias": torch.randn(16, generator=g),
             "encoder.weight": torch.randn(16, d, generator=g), "decoder.weight": torch.randn(d, 16, generator=g),
             "activation": "TopK", "activation_state_dict": {"k": 4}}
    (tmp_path / "oa").mkdir()
    torch.save(state, tmp_path / "oa" / "ae.pt")
    with pytest.raises(SAEError, match="give --sae-site"):
        load_sae(tmp_path / "oa")
    sae = load_sae(tmp_path / "oa", "blocks.0.hook_resid_post")
    x = torch.randn(2, 3, d)
    pre = (x - state["pre_bias"]) @ state["encoder.weight"].T + state["latent_bias"]
    kth = pre.topk(4, dim=-1).values[..., -1:]
    want = torch.where(pre >= kth, pre.relu(), torch.zeros_like(pre))
    assert torch.allclose(sae.encode(x), want, atol=1e-6)


@pytest.mark.parametrize("case", ["shape", "activation", "missing", "site"])
def test_bad_autoencoders_are_one_line_errors_and_write_nothing(tmp_path, gpt2_dir, case):
    d = 32
    folder, _ = write_saelens(tmp_path / "sae", d, 8, "blocks.0.hook_mlp_out")
    expect = ""
    if case == "shape":
        folder, _ = write_saelens(tmp_path / "sae", 20, 8, "blocks.0.hook_mlp_out")
        expect = "reads 20 dims"
    elif case == "activation":
        cfg = json.loads((folder / "cfg.json").read_text())
        (folder / "cfg.json").write_text(json.dumps({**cfg, "architecture": "gated"}))
        expect = "unknown SAE activation"
    elif case == "missing":
        (folder / "sae_weights.safetensors").unlink()
        expect = "no sae_weights.safetensors"
    elif case == "site":
        cfg = json.loads((folder / "cfg.json").read_text())
        (folder / "cfg.json").write_text(json.dumps({**cfg, "metadata": {"hook_name": "blocks.9.hook_mlp_out"}}))
        expect = "not a hook site"
    prompts = write_prompts(tmp_path / "p.jsonl")
    db = tmp_path / "wh.duckdb"
    r = CliRunner().invoke(cli, ["populate", str(prompts), "--model", str(gpt2_dir), "--db", str(db),
                                 "--sae", str(folder), "--scalars", "sae_act_times_grad", "--top", "0"])
    assert r.exit_code != 0 and len(r.output.strip().splitlines()) == 1 and expect in r.output, r.output
    assert not db.exists()


def test_populate_with_sae_stores_only_active_latents(tmp_path, gpt2_dir):
    from actwh.warehouse import Warehouse

    folder, _ = write_saelens(tmp_path / "sae", 32, 16, "blocks.1.hook_resid_pre", arch="jumprelu")
    prompts = write_prompts(tmp_path / "p.jsonl")
    db = tmp_path / "wh.duckdb"
    r = CliRunner().invoke(cli, ["populate", str(prompts), "--model", str(gpt2_dir), "--db", str(db),
                                 "--sae", str(folder), "--select", "dense", "--top", "0",
                                 "--scalars", "sae_latent_act,sae_act_times_grad,sae_error_act_times_grad"])
    assert r.exit_code == 0, r.output
    wh = Warehouse(db)
    assert wh.sql("SELECT count(*) AS n FROM saes WHERE site = 'blocks.1.hook_resid_pre'")["n"][0] == 1
    acts = wh.sql("SELECT value FROM node_scalars WHERE scalar = 'sae_latent_act'")
    assert acts.height > 0 and (acts["value"] != 0).all() and (acts["value"] > 0).all()
    layers = wh.sql("SELECT DISTINCT layer, node_type::VARCHAR AS t FROM node_scalars ORDER BY t")
    assert layers.rows() == [(1, "sae_error"), (1, "sae_latent")]
