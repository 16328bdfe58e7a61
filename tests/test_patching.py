"""Patched forward passes: exactness on every family, one edge against a hand-written hook
intervention, and a reference written with plain hooks on the transformers GPT-2 model."""

from __future__ import annotations

import json
import random

import pytest
import torch
import torch.nn.functional as F

from actwh.compute.edges import Node, downstream_nodes, upstream_nodes
from actwh.compute.loading import load_model
from actwh.compute.model import MLP, Attention
from actwh.compute.patching import (LayerWrites, allowed_edges, baseline_writes, edge_mask, mean_writes,
                                    run_patched, sparse_applies, upstream_writes)
from actwh.compute.targets import Batch
from actwh.errors import ActwhError

from conftest import PROMPTS, gain_sites, padded_batch, post_gain

CORRUPT = ["when John and Mary went to the store , Mary gave a ball to",
           "the dog",
           "one two three four five six seven eight nine ten ten nine eight"]


def make_batch(tokenizer, texts=PROMPTS, side="right"):
    tokens, mask = padded_batch(tokenizer, texts, side)
    return Batch(tokens, mask, torch.tensor([5, 7, 9]), torch.tensor([6, 8, 10]))


def corrupt_tokens(tokenizer, side="right"):
    return padded_batch(tokenizer, CORRUPT, side)[0]


def close(a, b, mask, tol):
    real = mask.bool()
    return (a[real] - b[real]).abs().max().item() <= tol


def sparse_or_skip(model, sparse):
    """`sparse` for run_patched; where sparse patching does not apply it must refuse, then skip."""
    if sparse and not sparse_applies(model):
        with pytest.raises(ActwhError, match="does not apply"):
            run_patched(model, make_batch_for(model), torch.zeros(
                len(upstream_nodes(model)), len(downstream_nodes(model)), dtype=torch.bool), sparse=True)
        pytest.skip("sparse patching does not apply to this family")
    return sparse


def make_batch_for(model):
    tokens = torch.tensor([[3, 4, 5]])
    return Batch(tokens, torch.ones_like(tokens), tokens[:, 0], tokens[:, 1])


@pytest.mark.parametrize("sparse", [False, True], ids=["hooks", "sparse"])
@pytest.mark.parametrize("side", ["right", "left"])
def test_nothing_patched_is_clean_and_everything_patched_is_corrupt(tiny_model, side, sparse):
    model = tiny_model.model
    sparse_or_skip(model, sparse)
    batch = make_batch(tiny_model.tokenizer, side=side)
    bad = corrupt_tokens(tiny_model.tokenizer, side)
    U, V = len(upstream_nodes(model)), len(downstream_nodes(model))
    with torch.no_grad():
        clean = model(batch.tokens, batch.mask)
        corrupt = model(bad, batch.mask)
    assert not close(clean, corrupt, batch.mask, 1e-2)  # the two runs differ
    # the scored positions' logits alone, for a circuit in between
    some = torch.rand(len(upstream_nodes(model)), len(downstream_nodes(model)),
                      generator=torch.Generator().manual_seed(5)) < 0.3
    whole = run_patched(model, batch, some, bad, sparse=sparse)
    pos = batch.scored_positions
    at = run_patched(model, batch, some, bad, sparse=sparse, positions=pos)
    assert at.shape == (3, 1, model.cfg.d_vocab)
    assert (at[:, 0] - whole[torch.arange(3), pos]).abs().max() <= 1e-5
    all_kept = torch.ones(U, V, dtype=torch.bool)
    none_kept = torch.zeros(U, V, dtype=torch.bool)
    assert close(run_patched(model, batch, all_kept, bad, sparse=sparse), clean, batch.mask, 1e-5)
    assert close(run_patched(model, batch, none_kept, bad, sparse=sparse), corrupt, batch.mask, 1e-4)
    # every edge patched to the clean prompt's own writes runs every patch and changes nothing
    assert close(run_patched(model, batch, none_kept, batch.tokens, sparse=sparse), clean,
                 batch.mask, 1e-5)


def test_zero_and_mean_baselines_patch_everything_to_the_baseline(tiny_model):
    """Everything patched to zero: each input is the attention output biases alone."""
    model = tiny_model.model
    cfg = model.cfg
    batch = make_batch(tiny_model.tokenizer, side="left")
    U, V = len(upstream_nodes(model)), len(downstream_nodes(model))
    none_kept = torch.zeros(U, V, dtype=torch.bool)

    # Reference by hand: with every edge zeroed, a block's sublayers read only the running sum
    # of the attention output biases; the target reads Σ of all of them.
    bias = torch.zeros(cfg.d_model)
    hooks = []
    for L, blk in enumerate(model.blocks):
        pre = bias.clone()
        mid = pre if cfg.parallel else pre + blk.attn.b_O
        hooks += [(f"blocks.{L}.hook_resid_pre", lambda t, n, x=pre: torch.zeros_like(t) + x),
                  (f"blocks.{L}.hook_resid_mid", lambda t, n, x=mid: torch.zeros_like(t) + x)]
        bias = bias + blk.attn.b_O
        # a sublayer's own write never reaches another input: drop it from the stream
        hooks += [(f"blocks.{L}.hook_attn_out", lambda t, n, b=blk.attn.b_O: torch.zeros_like(t) + b),
                  (f"blocks.{L}.hook_mlp_out", lambda t, n: torch.zeros_like(t))]
    final = bias
    hooks.append((f"blocks.{cfg.n_layers - 1}.hook_resid_post",
                  lambda t, n: torch.zeros_like(t) + final))
    with torch.no_grad(), model.hooks(hooks):
        ref = model(batch.tokens, batch.mask)
    got = run_patched(model, batch, none_kept, "zero")
    # Without output biases (Qwen2, Mistral) every input is the zero vector, where an RMSNorm's
    # 1/sqrt(eps) magnifies the rounding of resid − Σ writes; the logits are then ~0 either way.
    degenerate = all(float(blk.attn.b_O.abs().max()) == 0 for blk in model.blocks)
    assert close(got, ref, batch.mask, 1e-2 if degenerate else 1e-4), (got - ref).abs().max()

    # mean baseline, from prompts of mixed lengths on both padding sides: per position over the
    # prompts that reach it
    means = mean_writes(model, [make_batch(tiny_model.tokenizer, side="left"),
                                make_batch(tiny_model.tokenizer, PROMPTS[:2], side="right")])
    w = upstream_writes(model, *padded_batch(tiny_model.tokenizer, PROMPTS))  # right padded
    lengths = [len(tiny_model.tokenizer(t).input_ids) for t in PROMPTS]
    assert len(set(lengths)) > 1
    for j in range(max(lengths)):
        rows = [i for i in (0, 1, 2, 0, 1) if lengths[i] > j]
        assert torch.allclose(means[j], sum(w[i, j] for i in rows) / len(rows), atol=1e-5)
    base = baseline_writes(model, batch, means)
    pos = model.positions(batch.mask)
    assert torch.equal(base[1, -1], means[pos[1, -1]])


def test_one_patched_edge_changes_its_input_by_its_write_difference(tiny_model):
    """Patch u → (layer 1, head h, q) alone: only that head's q input moves, by exactly
    −(clean − corrupt write of u), and the logits equal a hand-written hook intervention."""
    model = tiny_model.model
    cfg = model.cfg
    batch = make_batch(tiny_model.tokenizer)
    bad = corrupt_tokens(tiny_model.tokenizer)
    up, down = upstream_nodes(model), downstream_nodes(model)
    blk = model.blocks[1]
    mlp_node = Node(0, "mlp_expert", 1) if cfg.n_experts else Node(0, "mlp", 0)
    for u, site, h in ((Node(0, "attn_head", 2), "q", 1), (Node(-1, "embed", 0), "k", 0),
                       (mlp_node, "v", cfg.n_kv_heads - 1)):
        v = Node(1, "attn_head", h, site)
        keep = torch.ones(len(up), len(down), dtype=torch.bool)
        keep[up.index(u), down.index(v)] = False
        # the write of u, by hand, on both prompts
        names = ["hook_embed", "blocks.0.attn.hook_z", "blocks.0.hook_mlp_out", "blocks.1.hook_resid_pre"]
        names += ["hook_pos_embed"] if "hook_pos_embed" in model.hook_points else []
        names += gain_sites(model, 0) + ["blocks.0.mlp.hook_post"]

        def write(cache):
            if u.node_type == "embed":
                return cache.acts["hook_embed"] + cache.acts.get("hook_pos_embed", 0)
            if u.node_type == "mlp":
                return cache.acts["blocks.0.hook_mlp_out"]
            if u.node_type == "mlp_expert":  # expert 1: its neurons' routed, weighted writes
                lo, hi = cfg.d_mlp, 2 * cfg.d_mlp
                return cache.acts["blocks.0.mlp.hook_post"][..., lo:hi] @ model.blocks[0].mlp.W_out[lo:hi]
            return post_gain(model, cache.acts, 0, "ln1_post") * (
                cache.acts["blocks.0.attn.hook_z"][:, :, u.index] @ model.blocks[0].attn.W_O[u.index])
        c = model.run_with_cache(batch.tokens, names, attention_mask=batch.mask)
        k = model.run_with_cache(bad, names, attention_mask=batch.mask)
        x = c.acts["blocks.1.hook_resid_pre"] - (write(c) - write(k))
        W = {"q": blk.attn.W_Q, "k": blk.attn.W_K, "v": blk.attn.W_V}[site][h]
        b = {"q": blk.attn.b_Q, "k": blk.attn.b_K, "v": blk.attn.b_V}[site][h]
        expected_in = blk.ln1(x) @ W + b

        def swap(t, name):
            t = t.clone()
            t[:, :, h] = expected_in
            return t
        with torch.no_grad(), model.hooks([(f"blocks.1.attn.hook_{site}", swap)]):
            ref = model(batch.tokens, batch.mask)
        for sparse in (False, None):
            got = run_patched(model, batch, keep, bad, sparse=sparse)
            assert close(got, ref, batch.mask, 1e-5)
        clean = model(batch.tokens, batch.mask)
        assert not close(got, clean, batch.mask, 1e-4)  # the patch did something


def test_edge_pairs_and_per_prompt_masks(tiny_model):
    model = tiny_model.model
    batch = make_batch(tiny_model.tokenizer)
    bad = corrupt_tokens(tiny_model.tokenizer)
    up, down = upstream_nodes(model), downstream_nodes(model)
    allowed = allowed_edges(model)
    g = torch.Generator().manual_seed(3)
    masks = torch.rand(3, len(up), len(down), generator=g) < 0.5
    together = run_patched(model, batch, masks, bad)
    for i in range(3):
        one = Batch(batch.tokens[i:i + 1], batch.mask[i:i + 1], batch.target_ids[i:i + 1],
                    batch.distractor_ids[i:i + 1])
        pairs = [(up[a], down[b]) for a, b in (masks[i] & allowed).nonzero().tolist()]
        alone = run_patched(model, one, pairs, bad[i:i + 1])
        assert close(together[i:i + 1], alone, one.mask, 1e-5)
    with pytest.raises(Exception, match="keep_edges must be"):
        run_patched(model, batch, masks[:, :-1], bad)
    base = upstream_writes(model, bad, batch.mask)
    for wrong in (base.double(), base[:, :-1]):  # precomputed writes of another dtype or shape
        with pytest.raises(ActwhError, match="base must be the baseline writes"):
            run_patched(model, batch, masks, base=wrong)
    with pytest.raises(Exception, match="not a downstream node"):
        edge_mask(model, [(up[0], Node(0, "attn_head", 99, "q"))])


@pytest.mark.parametrize("side", ["right", "left"])
def test_a_sparse_pass_runs_only_the_circuits_nodes_and_matches_every_node_run(tiny_model, side,
                                                                               monkeypatch):
    """Small circuits, a different one per prompt: the sparse pass runs exactly the heads and MLPs
    with a kept out-edge in some prompt (the key/value heads they read; whole layers and the last
    layers skipped), and its logits, at every position or at the scored ones, equal the pass that
    runs every node through hooks."""
    model = tiny_model.model
    sparse_or_skip(model, True)
    cfg = model.cfg
    batch = make_batch(tiny_model.tokenizer, side=side)
    bad = corrupt_tokens(tiny_model.tokenizer, side)
    up, down = upstream_nodes(model), downstream_nodes(model)
    allowed = allowed_edges(model)
    layer_of = {id(b.attn): L for L, b in enumerate(model.blocks)}
    mlp_layer = {id(b.mlp): L for L, b in enumerate(model.blocks)}
    ran = []
    attend, mlp_forward = Attention.attend, MLP.forward
    monkeypatch.setattr(Attention, "attend", lambda self, q, *a, **k: ran.append(
        ("heads", layer_of[id(self)], q.shape[2], a[1].shape[2])) or attend(self, q, *a, **k))
    monkeypatch.setattr(MLP, "forward", lambda self, x: ran.append(
        ("mlp", mlp_layer[id(self)])) or mlp_forward(self, x))
    rng = random.Random(7)
    heads_of = lambda u: up[u].node_type == "attn_head"  # noqa: E731
    for trial in range(4):
        # per prompt: a few nodes of layer 0 and (trial ≥ 2) layer 1, edges among them and on
        # to later inputs
        masks = torch.zeros(3, len(up), len(down), dtype=torch.bool)
        for i in range(3):
            inside = [a for a in range(len(up)) if up[a].layer <= (1 if trial >= 2 else 0)
                      and rng.random() < 0.3]
            for a in inside:
                for b in allowed[a].nonzero()[:, 0].tolist():
                    masks[i, a, b] = rng.random() < 0.4
        base = upstream_writes(model, bad, batch.mask)
        ref = run_patched(model, batch, masks, bad, sparse=False)
        pos = batch.scored_positions
        at = run_patched(model, batch, masks, base=base, sparse=True, positions=pos)
        ran.clear()
        with torch.enable_grad():
            got = run_patched(model, batch, masks, base=base, sparse=True)
        assert close(got, ref, batch.mask, 2e-5), (got - ref).abs().max()
        assert not got.requires_grad  # no autograd graph kept, whoever calls
        assert at.shape == (3, 1, cfg.d_vocab)
        assert (at[:, 0] - ref[torch.arange(3), pos]).abs().max() <= 2e-5
        needed = (masks & allowed).any(dim=(0, 2))
        want = []
        for L in range(cfg.n_layers):
            h = [u for u in range(len(up)) if heads_of(u) and up[u].layer == L and needed[u]]
            if h:
                groups = {up[u].index // (cfg.n_heads // cfg.n_kv_heads) for u in h}
                n = cfg.n_heads if cfg.qk_norm == "all" else len(h)
                want.append(("heads", L, n, cfg.n_kv_heads if cfg.qk_norm == "all" else len(groups)))
            if any(up[u].node_type == "mlp" and up[u].layer == L and needed[u] for u in range(len(up))):
                want.append(("mlp", L))
        assert ran == want
        assert len(want) < 2 * cfg.n_layers  # something was skipped


# ---------------------------------------------------------------------------------------------
# Independent reference: the transformers GPT-2 model with plain PyTorch hooks on its modules.

def hf_patched(hf, tokens, mask, kept: set, base: dict | None):
    """Logits of transformers' GPT-2 with every edge not in `kept` patched to `base`'s writes.

    Edge names: upstream "emb", ("head", L, h), ("mlp", L); downstream ("q"|"k"|"v", L, h),
    ("mlp", L), "out". base: the baseline run's writes by upstream name (None: record them)."""
    tr = hf.transformer
    n_layers, n_heads = len(tr.h), hf.config.n_head
    e = hf.config.n_embd // n_heads
    writes, resid, handles = {}, {}, []
    pos = (mask.long().cumsum(-1) - 1).clamp(min=0)

    def delta(down, x):
        for name, w in writes.items():
            if (name, down) not in kept and base is not None:
                x = x - (w - base[name])
        return x

    def emb_hook(mod, inp, out):
        writes["emb"] = writes.get("emb", 0) + out
    handles += [tr.wte.register_forward_hook(emb_hook), tr.wpe.register_forward_hook(emb_hook)]
    for L, blk in enumerate(tr.h):
        def pre(mod, args, kwargs, L=L):
            resid["pre", L] = args[0] if args else kwargs["hidden_states"]
        handles.append(blk.register_forward_pre_hook(pre, with_kwargs=True))

        def c_attn(mod, inp, out, L=L, blk=blk):
            out = out.clone()
            for j, site in enumerate("qkv"):
                for h in range(n_heads):
                    x = delta((site, L, h), resid["pre", L])
                    ln = F.layer_norm(x, (x.shape[-1],), blk.ln_1.weight, blk.ln_1.bias, blk.ln_1.eps)
                    cols = slice(j * hf.config.n_embd + h * e, j * hf.config.n_embd + (h + 1) * e)
                    out[..., cols] = ln @ mod.weight[:, cols] + mod.bias[cols]
            return out
        handles.append(blk.attn.c_attn.register_forward_hook(c_attn))

        def c_proj(mod, args, L=L):
            z = args[0]
            for h in range(n_heads):
                writes["head", L, h] = z[..., h * e:(h + 1) * e] @ mod.weight[h * e:(h + 1) * e]
        handles.append(blk.attn.c_proj.register_forward_pre_hook(c_proj))

        def ln_2(mod, args, out, L=L):
            x = delta(("mlp", L), args[0])
            return F.layer_norm(x, (x.shape[-1],), mod.weight, mod.bias, mod.eps)
        handles.append(blk.ln_2.register_forward_hook(ln_2))

        def mlp(mod, args, out, L=L):
            writes["mlp", L] = out
        handles.append(blk.mlp.register_forward_hook(mlp))

    def ln_f(mod, args, out):
        x = delta("out", args[0])
        return F.layer_norm(x, (x.shape[-1],), mod.weight, mod.bias, mod.eps)
    handles.append(tr.ln_f.register_forward_hook(ln_f))
    try:
        with torch.no_grad():
            logits = hf(input_ids=tokens, attention_mask=mask, position_ids=pos).logits
    finally:
        for hd in handles:
            hd.remove()
    return logits, dict(writes)


def hf_name(node: Node):
    if node.node_type == "embed":
        return "emb"
    if node.node_type == "logit":
        return "out"
    if node.node_type == "mlp":
        return ("mlp", node.layer)
    return ("head", node.layer, node.index) if node.down_input is None else \
        (node.down_input, node.layer, node.index)


def logit_diff(logits, batch):
    rows = torch.arange(len(logits))
    pos = batch.scored_positions
    return logits[rows, pos, batch.target_ids] - logits[rows, pos, batch.distractor_ids]


def check_against_transformers(folder, batch, bad, seed, n_sets=3):
    import transformers as T

    loaded = load_model(folder, device="cpu")
    model = loaded.model
    hf = T.AutoModelForCausalLM.from_pretrained(folder, attn_implementation="eager").eval()
    up, down = upstream_nodes(model), downstream_nodes(model)
    allowed = allowed_edges(model)
    _, base = hf_patched(hf, bad, batch.mask, set(), None)
    rng = random.Random(seed)
    pairs_all = [(a, b) for a, b in allowed.nonzero().tolist()]
    # random edge sets, then circuits on a random third of the nodes (most heads, MLPs and whole
    # layers outside them: the patched pass skips those)
    sets = [(0.0, 1), (0.2, 1), (0.6, 1), (0.9, 1)][:n_sets + 1] + [(0.5, 0.3), (0.9, 0.3)]
    for fraction, nodes in sets:
        inside = {a for a in range(len(up)) if rng.random() < nodes}
        chosen = [p for p in pairs_all if p[0] in inside and rng.random() < fraction]
        kept = {(hf_name(up[a]), hf_name(down[b])) for a, b in chosen}
        ref, _ = hf_patched(hf, batch.tokens, batch.mask, kept, base)
        for sparse in (False, True):  # every node through hooks; only the circuit's nodes
            got = run_patched(model, batch, [(up[a], down[b]) for a, b in chosen], bad, sparse=sparse)
            assert (logit_diff(got, batch) - logit_diff(ref, batch)).abs().max() <= 1e-4
            assert close(got, ref, batch.mask, 1e-4)
    # the reference does patch: nothing kept reproduces the corrupted run
    with torch.no_grad():
        corrupt = hf(input_ids=bad, attention_mask=batch.mask,
                     position_ids=(batch.mask.cumsum(-1) - 1).clamp(min=0)).logits
    ref, _ = hf_patched(hf, batch.tokens, batch.mask, set(), base)
    assert close(ref, corrupt, batch.mask, 1e-4)


def test_patched_metric_equals_transformers_reference_tiny_gpt2(gpt2_dir):
    loaded = load_model(gpt2_dir, device="cpu")
    batch = make_batch(loaded.tokenizer, side="left")
    check_against_transformers(gpt2_dir, batch, corrupt_tokens(loaded.tokenizer, "left"), seed=0)


def test_patched_metric_equals_transformers_reference_default_model():
    from actwh.compute.default_model import WEIGHTS, default_prompts

    loaded = load_model(WEIGHTS, device="cpu")
    rows = [json.loads(line) for line in default_prompts("ioi").read_text().splitlines()][:6]
    tok = loaded.tokenizer
    ids = [tok(r["text"]).input_ids for r in rows]
    bad = [tok(r["corrupt"]).input_ids for r in rows]
    n = max(map(len, ids))
    pad = tok.pad_token_id or 0
    tokens = torch.tensor([x + [pad] * (n - len(x)) for x in ids])
    corrupt = torch.tensor([x + [pad] * (n - len(x)) for x in bad])
    mask = torch.tensor([[1] * len(x) + [0] * (n - len(x)) for x in ids])
    one = lambda s: tok(" " + s, add_special_tokens=False).input_ids[-1]  # noqa: E731
    batch = Batch(tokens, mask, torch.tensor([one(r["target"]) for r in rows]),
                  torch.tensor([one(r["distractor"]) for r in rows]))
    check_against_transformers(WEIGHTS, batch, corrupt, seed=1, n_sets=2)


@pytest.mark.parametrize("family_dir", ["qwen2", "gemma2"], indirect=True)
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_an_input_with_no_kept_edge_is_the_baseline_stream_exactly(family_dir, dtype):
    """Zero baseline, no attention output bias (Qwen2: the sparse pass; Gemma 2: post norms, the
    hooked pass): with every edge kept except those into one head's q, that q reads exactly
    zero, so it is its bias alone (a hand-written hook), in float32 and bfloat16 alike; a sum of
    writes that cancels to zero would leave rounding that the RMSNorm magnifies. The other
    prompt, whose circuit keeps that head's q edges, is the clean run."""
    loaded = load_model(family_dir[1], device="cpu", dtype=getattr(torch, dtype))
    model = loaded.model
    assert all("b_O" in blk.attn.absent_biases for blk in model.blocks)
    batch = make_batch(loaded.tokenizer, PROMPTS[:2])
    batch = Batch(batch.tokens, batch.mask, batch.target_ids[:2], batch.distractor_ids[:2])
    up, down = upstream_nodes(model), downstream_nodes(model)
    keep = torch.ones(2, len(up), len(down), dtype=torch.bool)
    q = down.index(Node(1, "attn_head", 1, "q"))
    keep[0, :, q] = False

    def only_bias(t, name):
        t = t.clone()
        t[0, :, 1] = model.blocks[1].attn.b_Q[1]
        return t
    with torch.no_grad(), model.hooks([("blocks.1.attn.hook_q", only_bias)]):
        ref = model(batch.tokens, batch.mask)
    got = run_patched(model, batch, keep, "zero")
    tol = 1e-5 if dtype == "float32" else 0.05  # bf16: 0.75 off when the sum cancels
    assert close(got.float(), ref.float(), batch.mask, tol), (got - ref).abs().max()
    assert not close(ref[:1], model(batch.tokens, batch.mask)[:1], batch.mask[:1], 1e-3)


def test_baseline_writes_kept_per_layer_patch_as_the_per_node_ones(tiny_model):
    """`LayerWrites` (each layer's z and MLP output, the heads' writes formed only where a pass
    runs them) gives the sparse pass what the [b, p, nodes, d] writes give it, for small
    per-prompt circuits, the corrupt and the zero baseline; it holds far fewer numbers; its run's
    logits are the corrupted forward's; the hooked pass and another batch's writes are refused."""
    model = tiny_model.model
    sparse_or_skip(model, True)
    cfg = model.cfg
    batch = make_batch(tiny_model.tokenizer, side="left")
    bad = corrupt_tokens(tiny_model.tokenizer, "left")
    up, down = upstream_nodes(model), downstream_nodes(model)
    per_layer, logits = LayerWrites.of_run(model, bad, batch.mask)
    with torch.no_grad():
        assert close(logits, model(bad, batch.mask), batch.mask, 0.0)
    per_node = upstream_writes(model, bad, batch.mask)
    g = torch.Generator().manual_seed(11)
    inside = torch.rand(len(up), generator=g) < 0.4
    inside[[1, 3]] = True  # two heads of layer 0 at least: the writes of several heads at once
    masks = (torch.rand(3, len(up), len(down), generator=g) < 0.5) & inside[None, :, None]
    for base_a, base_b in ((per_layer, per_node),
                           (LayerWrites.zeros(model, *batch.tokens.shape), baseline_writes(model, batch, "zero"))):
        a = run_patched(model, batch, masks, base=base_a)
        b = run_patched(model, batch, masks, base=base_b)
        assert close(a, b, batch.mask, 1e-5), (a - b).abs().max()
    held = per_layer.embed.numel() + sum(t.numel() for t in per_layer.z + per_layer.mlp)
    tokens = batch.tokens.numel()
    assert held == tokens * (cfg.d_model + cfg.n_layers * (cfg.n_heads * cfg.d_head + cfg.d_model))
    assert held < per_node.numel()
    with pytest.raises(ActwhError, match="for sparse patching"):
        run_patched(model, batch, masks, base=per_layer, sparse=False)
    other = Batch(batch.tokens[:2], batch.mask[:2], batch.target_ids[:2], batch.distractor_ids[:2])
    with pytest.raises(ActwhError, match="another batch"):
        run_patched(model, other, masks[:2], base=per_layer)
