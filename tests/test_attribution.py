"""Node attributions with baselines: equal to (clean − corrupt) · gradient computed with plain
hooks on the transformers GPT-2, with integrated gradients as EAP-IG integrates, and summing to
the EAP-IG edges out of each node (the same convention)."""

from __future__ import annotations

import pytest
import torch

from actwh.compute.attribution import ATTRIBUTIONS, node_attributions
from actwh.compute.edges import component_edges, upstream_nodes
from actwh.compute.loading import load_model
from actwh.compute.targets import Batch

from conftest import PROMPTS, padded_batch
from test_patching import CORRUPT

NAMES = ("attn_attribution", "mlp_attribution", "mlp_layer_attribution", "embed_attribution")


def hf_attributions(folder, tokens, bad, mask, target, distractor, ig_steps=0):
    """(clean − corrupt) · ∂logit_diff/∂activation on transformers' GPT-2, by plain hooks;
    with ig_steps, the gradient averaged over inputs corrupt + k/N (clean − corrupt)."""
    import transformers as T

    hf = T.AutoModelForCausalLM.from_pretrained(folder, attn_implementation="eager").eval()
    tr = hf.transformer
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    e = hf.config.n_embd // hf.config.n_head

    def run(ids=None, embeds=None):
        acts, handles = {}, []

        def keep(name):
            def hook(mod, args, out=None):
                t = args[0] if out is None else out
                t.retain_grad()
                acts[name] = t
            return hook
        for L, blk in enumerate(tr.h):
            handles.append(blk.attn.c_proj.register_forward_pre_hook(keep(("z", L))))
            handles.append(blk.mlp.act.register_forward_hook(keep(("post", L))))
            handles.append(blk.mlp.register_forward_hook(keep(("mlp", L))))
        handles.append(tr.drop.register_forward_pre_hook(keep("embed")))
        try:
            out = hf(input_ids=ids, inputs_embeds=embeds, attention_mask=mask,
                     position_ids=pos).logits
        finally:
            for h in handles:
                h.remove()
        last = mask.sum(-1) - 1
        rows = torch.arange(len(out))
        (out[rows, last, target] - out[rows, last, distractor]).sum().backward()
        return acts

    clean, base = run(tokens), run(bad)
    if ig_steps:
        w_clean, w_bad = tr.wte(tokens).detach(), tr.wte(bad).detach()
        grads = None
        for k in range(ig_steps):
            acts = run(embeds=w_bad + k / ig_steps * (w_clean - w_bad))
            g = {n: t.grad for n, t in acts.items()}
            grads = g if grads is None else {n: grads[n] + g[n] for n in g}
        grads = {n: g / ig_steps for n, g in grads.items()}
    else:
        grads = {n: t.grad for n, t in clean.items()}
    diff = {n: (clean[n] - base[n]).detach() for n in clean}
    n_layers = len(tr.h)
    heads = torch.stack([(diff["z", L] * grads["z", L]).unflatten(-1, (-1, e)).sum(-1)
                         for L in range(n_layers)], 2)
    neurons = torch.stack([diff["post", L] * grads["post", L] for L in range(n_layers)], 2)
    mlps = torch.stack([(diff["mlp", L] * grads["mlp", L]).sum(-1, keepdim=True)
                        for L in range(n_layers)], 2)
    embed = (diff["embed"] * grads["embed"]).sum(-1)[:, :, None, None]
    return dict(zip(NAMES, (heads, neurons, mlps, embed)))


@pytest.mark.parametrize("ig_steps", [0, 3])
def test_corrupt_baseline_attributions_equal_transformers_gradients(gpt2_dir, ig_steps):
    loaded = load_model(gpt2_dir, device="cpu")
    tokens, mask = padded_batch(loaded.tokenizer, PROMPTS)
    bad = padded_batch(loaded.tokenizer, CORRUPT)[0]
    tgt, dis = torch.tensor([5, 7, 9]), torch.tensor([6, 8, 10])
    batch = Batch(tokens, mask, tgt, dis)
    ours = node_attributions(loaded.model, batch, "logit_diff", NAMES, bad, ig_steps)
    ref = hf_attributions(gpt2_dir, tokens, bad, mask, tgt, dis, ig_steps)
    real = mask.bool()
    for name in NAMES:
        assert ours[name].shape == ref[name].shape, name
        assert torch.allclose(ours[name][real], ref[name][real], atol=1e-5), name
        assert (ours[name][~real] == 0).all()
        assert ours[name][real].abs().max() > 1e-3  # not vacuous


@pytest.mark.parametrize("ig_steps", [0, 4])
def test_node_attributions_are_the_eap_edges_out_of_each_node(tiny_model, ig_steps):
    """Σ over downstream nodes of EAP(-IG) edges u → v = u's attribution summed over positions:
    Δwrite_u · Σ_v ∂m/∂in_v = Δwrite_u · ∂m/∂write_u, on every family."""
    model = tiny_model.model
    tokens, mask = padded_batch(tiny_model.tokenizer, PROMPTS, side="left")
    bad = padded_batch(tiny_model.tokenizer, CORRUPT, side="left")[0]
    batch = Batch(tokens, mask, torch.tensor([5, 7, 9]), torch.tensor([6, 8, 10]))
    ours = node_attributions(model, batch, "logit_diff",
                             ("attn_attribution", "mlp_layer_attribution", "embed_attribution"),
                             bad, ig_steps)
    edges = component_edges(model, batch, "logit_diff", corrupt=bad, ig_steps=ig_steps)
    out_sum = edges.values.sum(-1)  # [b, U]
    experts = {}  # mixture of experts: the layer's experts together are its MLP
    for i, u in enumerate(upstream_nodes(model)):
        if u.node_type == "mlp_expert":
            experts[u.layer] = experts.get(u.layer, 0) + out_sum[:, i]
            continue
        if u.node_type == "embed":
            mine = ours["embed_attribution"].sum((1, 2, 3))
        elif u.node_type == "mlp":
            mine = ours["mlp_layer_attribution"][:, :, u.layer, 0].sum(1)
        else:
            mine = ours["attn_attribution"][:, :, u.layer, u.index].sum(1)
        assert torch.allclose(mine, out_sum[:, i], atol=1e-4, rtol=1e-4), u
    for L, total in experts.items():
        mine = ours["mlp_layer_attribution"][:, :, L, 0].sum(1)
        assert torch.allclose(mine, total, atol=1e-4, rtol=1e-4), L


def test_zero_baseline_is_act_times_grad_and_bad_input_refused(gpt2_dir):
    from actwh.compute.scalars import compute_scalars

    loaded = load_model(gpt2_dir, device="cpu")
    tokens, mask = padded_batch(loaded.tokenizer, PROMPTS)
    batch = Batch(tokens, mask, torch.tensor([5, 7, 9]), torch.tensor([6, 8, 10]))
    ours = node_attributions(loaded.model, batch, "logit_diff", ("mlp_attribution",
                                                                "attn_attribution",
                                                                "embed_attribution"))
    res = compute_scalars(loaded.model, batch, "logit_diff",
                          ["mlp_act_times_grad", "attn_act_times_grad", "token_attribution"])
    real = mask.bool()
    assert torch.allclose(ours["embed_attribution"][real], res.token["token_attribution"][real],
                          atol=1e-5)  # token + position embedding, both zeroed
    assert torch.allclose(ours["mlp_attribution"][real], res.token["mlp_act_times_grad"][real],
                          atol=1e-5)
    assert torch.allclose(ours["attn_attribution"][real], res.token["attn_act_times_grad"][real],
                          atol=1e-5)
    with pytest.raises(Exception, match="unknown attribution"):
        node_attributions(loaded.model, batch, "logit_diff", ("attn_pattern",))
    with pytest.raises(Exception, match="as many tokens"):
        node_attributions(loaded.model, batch, "logit_diff", ("mlp_attribution",), tokens[:, :3])
    assert set(ATTRIBUTIONS) >= set(NAMES)


def test_populate_stores_attributions_and_ranks_by_them(tmp_path, gpt2_dir):
    """--baseline corrupt --ig-steps 2: stored rows equal node_attributions on the same prompts;
    the closing table ranks by them and says so; bad combinations are refused."""
    import duckdb
    from click.testing import CliRunner

    from actwh.cli.main import cli
    from actwh.compute.patching import mean_acts
    from test_evaluate import ROWS

    from conftest import IOI_ROWS, write_prompts

    prompts = write_prompts(tmp_path / "p.jsonl", ROWS)
    db = tmp_path / "wh.duckdb"
    names = "attn_attribution,mlp_attribution,embed_attribution"
    runner = CliRunner()
    out = runner.invoke(cli, ["populate", str(prompts), "--model", str(gpt2_dir), "--db", str(db),
                              "--scalars", names, "--select", "dense", "--baseline", "corrupt",
                              "--ig-steps", "2", "--batch-size", "3"])
    assert out.exit_code == 0, out.output
    assert "ranked by attn_attribution, mlp_attribution, embed_attribution" in out.output
    assert "corrupt baseline, 2 IG steps" in out.output
    loaded = load_model(gpt2_dir, device="cpu")
    tok = loaded.tokenizer
    with duckdb.connect(str(db), read_only=True) as con:
        stored = con.sql("SELECT prompt_id, position, layer, node_index, scalar::VARCHAR, value "
                         "FROM node_scalars WHERE run_id = 1").fetchall()
    assert len(stored) > 0
    # the completeness line: Σ embed_attribution per prompt and Δmetric = clean − corrupt
    import re

    import transformers as T

    line = next(x for x in out.output.splitlines() if x.startswith("completeness"))
    got = dict(re.findall(r"Σ (\w+) (-?[\d.e+-]+)", line))
    delta = float(re.search(r"Δmetric \(clean − baseline input\) (-?[\d.e+-]+)", line).group(1))
    n = len(ROWS)
    emb = sum(r[5] for r in stored if r[4] == "embed_attribution") / n
    assert float(got["embed_attribution"]) == pytest.approx(emb, rel=2e-3, abs=1e-3)
    hf = T.AutoModelForCausalLM.from_pretrained(gpt2_dir).eval()
    diffs = []
    for row in ROWS:
        t, d = (loaded.tokenizer(row[k], add_special_tokens=False).input_ids[0]
                for k in ("target", "distractor"))
        m = [hf(torch.tensor([loaded.tokenizer(row[k]).input_ids])).logits[0, -1].detach()
             for k in ("text", "corrupt")]
        diffs.append(float((m[0][t] - m[0][d]) - (m[1][t] - m[1][d])))
    assert delta == pytest.approx(sum(diffs) / n, rel=2e-3, abs=1e-3)
    for pid, row in enumerate(ROWS):
        ids = torch.tensor([tok(row["text"]).input_ids])
        bad = torch.tensor([tok(row["corrupt"]).input_ids])
        t, d = (tok(row[k], add_special_tokens=False).input_ids[0] for k in ("target", "distractor"))
        b = Batch(ids, torch.ones_like(ids), torch.tensor([t]), torch.tensor([d]))
        ref = node_attributions(loaded.model, b, "logit_diff", names.split(","), bad, 2)
        mine = [r for r in stored if r[0] == pid]
        for _, pos, layer, index, scalar, value in mine:
            slot = 0 if scalar == "embed_attribution" else layer
            unit = 0 if scalar == "embed_attribution" else index
            assert value == pytest.approx(float(ref[scalar][0, pos, slot, unit]), abs=1e-4)
        assert len(mine) == sum(int(ref[n][0].numel()) for n in names.split(","))

    # the mean baseline: per-position means over every prompt of the run
    out = runner.invoke(cli, ["populate", str(prompts), "--model", str(gpt2_dir), "--db", str(db),
                              "--scalars", "mlp_attribution", "--select", "dense",
                              "--baseline", "mean", "--batch-size", "2", "--top", "0"])
    assert out.exit_code == 0, out.output
    singles = [Batch(torch.tensor([tok(r["text"]).input_ids]),
                     torch.ones(1, len(tok(r["text"]).input_ids), dtype=torch.long)) for r in ROWS]
    sites = [f"blocks.{L}.mlp.hook_post" for L in range(loaded.model.cfg.n_layers)] + [
        "hook_embed", "hook_pos_embed"]
    means = mean_acts(loaded.model, singles, sites)
    row = ROWS[2]
    ids = torch.tensor([tok(row["text"]).input_ids])
    t, d = (tok(row[k], add_special_tokens=False).input_ids[0] for k in ("target", "distractor"))
    ref = node_attributions(loaded.model, Batch(ids, torch.ones_like(ids), torch.tensor([t]),
                                                torch.tensor([d])),
                            "logit_diff", ["mlp_attribution"], means)["mlp_attribution"]
    with duckdb.connect(str(db), read_only=True) as con:
        got = con.sql("SELECT position, layer, node_index, value FROM node_scalars WHERE "
                      "run_id = 2 AND prompt_id = 2").fetchall()
    for pos, layer, index, value in got:
        assert value == pytest.approx(float(ref[0, pos, layer, index]), abs=1e-4)

    plain = write_prompts(tmp_path / "plain.jsonl", IOI_ROWS)
    for args, message in [(["--scalars", "mlp_attribution", "--baseline", "corrupt"], "corrupt"),
                          (["--ig-steps", "2"], "applies to edges")]:
        out = runner.invoke(cli, ["populate", str(plain), "--model", str(gpt2_dir), "--db",
                                  str(tmp_path / "bad.duckdb"), *args])
        assert out.exit_code != 0 and message in out.output, (args, out.output)
        assert not (tmp_path / "bad.duckdb").exists()
