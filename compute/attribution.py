"""Node attributions with a baseline: attribution patching per head, neuron, MLP layer,
embedding and autoencoder latent, optionally with integrated gradients.

    attribution(node, pos) = (a_clean − a_base)[pos] · mean_k ∂metric/∂a [pos]

where a is the node's activation (a head's z, a neuron's post-activation, an MLP layer's output,
the token + position embedding, a latent), the baseline is zero (then it is act × grad), the
corrupted prompt's activation (run with the clean prompt's attention mask), or the
per-position mean over prompts, and the gradient is taken at the clean input (ig_steps = 0) or
averaged over N runs whose input embeddings are baseline + α(clean − baseline), α = k/N,
k = 0 … N−1 — EAP-IG's integration points and its node-score convention (gradients at the
nodes of the interpolated runs, times the nodes' clean − baseline difference). Under post
norms a head's term is its write gain ⊙ (z_h W_O_h) (the post-norm's scale frozen per run, as
component edges define writes) times the gradient at the attention output, so a node's
attribution summed over positions is always the sum of its EAP(-IG) edges out.
"""

from __future__ import annotations

import torch

from actwh.compute.model import HookedTransformer
from actwh.compute.targets import Batch, Target, get_target
from actwh.errors import ActwhError

# scalar name -> (node type, site template ({L}: layer; {S}: autoencoder prefix), summed dims)
ATTRIBUTIONS = {
    "attn_attribution": ("attn_head", "blocks.{L}.attn.hook_z", "head"),
    "mlp_attribution": ("mlp_neuron", "blocks.{L}.mlp.hook_post", "unit"),
    "mlp_layer_attribution": ("mlp", "blocks.{L}.hook_mlp_out", "whole"),
    "embed_attribution": ("embed", "hook_embed", "whole"),
    "sae_attribution": ("sae_latent", "{S}.hook_latents", "unit"),
}
BASELINES = ("zero", "corrupt", "mean")


def _embed_names(model) -> list[str]:
    return [n for n in ("hook_embed", "hook_pos_embed") if n in model.hook_points]


def attribution_sites(model: HookedTransformer, names) -> dict[str, list[str]]:
    """The hook sites each requested attribution scalar reads, per layer (or autoencoder)."""
    from actwh.compute.sae import spliced

    from actwh.compute.model import post_norm_sites

    out = {}
    for name in names:
        _, site, _ = ATTRIBUTIONS[name]
        if name == "attn_attribution" and model.cfg.post_norm:
            # a head's write passes the post-norm's frozen gain (model.write_gain), as edges'
            out[name] = [s for L in range(model.cfg.n_layers) for s in (
                site.format(L=L), f"blocks.{L}.hook_attn_out", *post_norm_sites(model, L))]
        elif "{L}" in site:
            out[name] = [site.format(L=L) for L in range(model.cfg.n_layers)]
        elif "{S}" in site:
            out[name] = [site.format(S=s.info.prefix) for s in spliced(model)]
        else:
            out[name] = _embed_names(model)
    return out


def node_attributions(model: HookedTransformer, batch: Batch, target: str | Target, names,
                      baseline="zero", ig_steps: int = 0,
                      completeness: dict | None = None) -> dict[str, torch.Tensor]:
    """Attribution scalars as [batch, pos, slots, units] (slots: layers, autoencoders, or 1 for
    the embedding; units: heads, neurons, latents, or 1).

    baseline: "zero", corrupted token ids [b, p], or per-position means {site: [positions, ...]}
    (`actwh.compute.patching.mean_acts` over the run's prompts, including the embedding sites).
    completeness: filled with "delta" [b], the metric on the clean prompt minus the metric with
    the input embeddings at the baseline (what Σ embed_attribution approaches as N grows), and
    Σ of each scalar over nodes and positions per prompt.
    """
    target = get_target(target) if isinstance(target, str) else target
    for n in names:
        if n not in ATTRIBUTIONS:
            raise ActwhError(f"unknown attribution scalar {n!r}; valid: {', '.join(ATTRIBUTIONS)}")
    if ig_steps < 0:
        raise ActwhError("--ig-steps must be ≥ 0")
    batch = batch.to(model.device)
    per_name = attribution_sites(model, names)
    embeds = _embed_names(model)
    sites = sorted({s for v in per_name.values() for s in v} | set(embeds))
    metric = lambda logits: target.metric(logits, batch).sum()  # noqa: E731
    clean = model.run_with_cache(batch.tokens, sites, attention_mask=batch.mask,
                                 backward_of=None if ig_steps else metric)
    if isinstance(baseline, str):
        if baseline != "zero":
            raise ActwhError(f"unknown baseline {baseline!r}; valid: {', '.join(BASELINES)}")
        base = {s: torch.zeros_like(clean.acts[s]) for s in sites}
    elif isinstance(baseline, dict):
        pos = model.positions(batch.mask)
        base = {s: baseline[s].to(clean.acts[s].dtype)[pos.clamp(max=baseline[s].shape[0] - 1)]
                for s in sites}
    else:
        if baseline.shape != batch.tokens.shape:
            raise ActwhError("corrupted prompts must have as many tokens as their clean prompts")
        with torch.no_grad():
            base = model.run_with_cache(baseline.to(model.device), sites,
                                        attention_mask=batch.mask).acts
    if ig_steps:
        grads = {s: torch.zeros_like(clean.acts[s]) for s in sites}
        for k in range(ig_steps):
            alpha = k / ig_steps
            hooks = [(n, lambda t, n, a=alpha: (base[n] + a * (clean.acts[n] - base[n]))
                      .requires_grad_(True)) for n in embeds]
            step = model.run_with_cache(batch.tokens, sites, attention_mask=batch.mask,
                                        backward_of=metric, fwd_hooks=hooks)
            for s in sites:
                grads[s] += step.grads[s]
        grads = {s: g / ig_steps for s, g in grads.items()}
    else:
        grads = clean.grads
    out = {}
    mask = batch.mask[:, :, None, None].to(clean.logits.dtype)
    if completeness is not None:
        with torch.no_grad(), model.hooks([(n, lambda t, n: base[n]) for n in embeds]):
            low = target.metric(model(batch.tokens, batch.mask), batch)
        completeness["delta"] = (target.metric(clean.logits, batch) - low).detach()
    with torch.no_grad():
        for name in names:
            _, _, reduce = ATTRIBUTIONS[name]
            if name == "embed_attribution":
                diff = sum(clean.acts[s] - base[s] for s in embeds)
                g = grads["hook_embed"]  # the embeddings' sum: one gradient for both
                out[name] = (diff * g).sum(-1)[:, :, None, None] * mask
                continue
            if name == "attn_attribution" and model.cfg.post_norm:
                out[name] = _post_norm_heads(model, clean.acts, base, grads) * mask
                continue
            vals = []
            for s in per_name[name]:
                x = (clean.acts[s] - base[s]) * grads[s]
                vals.append(x.sum(-1) if reduce == "head" else
                            x.sum(-1, keepdim=True) if reduce == "whole" else x)
            if not vals:
                continue
            out[name] = torch.stack(vals, dim=2) * mask
    if completeness is not None:
        completeness.update({n: t.sum((1, 2, 3)) for n, t in out.items()})
    return out


DESCRIPTIONS = {
    "attn_attribution": "head z: (clean − baseline) · mean ∂target/∂z (--baseline, --ig-steps)",
    "mlp_attribution": "neuron: (clean − baseline) · mean ∂target/∂activation (--baseline, --ig-steps)",
    "mlp_layer_attribution": "MLP layer output: (clean − baseline) · mean gradient (--baseline, --ig-steps)",
    "embed_attribution": "token + position embedding: (clean − baseline) · mean gradient (--baseline, --ig-steps)",
    "sae_attribution": "latent: (clean − baseline) · mean ∂target/∂latent (--baseline, --ig-steps)",
}


def attribution_scalars() -> list:
    """Registry entries (compute/scalars.py) reading what `node_attributions` computed."""
    from actwh.compute.scalars import Scalar

    out = []
    for name, (node_type, site, _) in ATTRIBUTIONS.items():
        embed = node_type == "embed"
        # the sites read, declared as forward needs (the attribution runs its own passes)
        needs = (("hook_embed", "fwd"), ("hook_pos_embed", "fwd")) if embed else ((site, "fwd"),)
        out.append(Scalar(
            name, node_type, "token", DESCRIPTIONS[name], needs,
            lambda c, i, name=name, embed=embed: c.attributions[name][:, :, 0 if embed else i],
            embed_level=embed, sae_level=node_type == "sae_latent"))
    return out


def _post_norm_heads(model, clean, base, grads) -> torch.Tensor:
    """Heads under post norms: (write_clean − write_base) · ∂metric/∂attn_out, each write
    gain ⊙ (z_h W_O_h) with its own run's frozen post-norm gain, as component edges define it.
    [b, p, layers, heads]"""
    from actwh.compute.model import write_gain

    vals = []
    for L, block in enumerate(model.blocks):
        z = f"blocks.{L}.attn.hook_z"
        w_c = torch.einsum("bphe,hed->bphd", clean[z], block.attn.W_O) * \
            write_gain(model, clean, L, "attn")[:, :, None, :]
        w_b = torch.einsum("bphe,hed->bphd", base[z], block.attn.W_O) * \
            write_gain(model, base, L, "attn")[:, :, None, :]
        g = grads[f"blocks.{L}.hook_attn_out"][:, :, None, :]
        vals.append(((w_c - w_b) * g).sum(-1))
    return torch.stack(vals, dim=2)
