"""Derived scalars: one registry, one entry per scalar, and the engine that computes them.

An entry names its node type, its shape kind (`token`: per prompt, position, layer, node;
`pair`: per prompt, layer, head, query position, key position), the sites and pass types it
needs, and the function that computes it for one layer. Adding a scalar touches only `SCALARS`:
a warehouse made before it gains the new name in its `scalar` ENUM the next time it is opened
for writing (`WarehouseWriter` migrates the ENUMs; tests/test_resume.py checks it).
The plan for a request is the union of the requested entries' sites, so a request for one
scalar never caches what the others would need.

Direct effects are write · g, where g is the gradient of the target's linear readout at the final
residual stream with the final LayerNorm scale (and the softmax normaliser) held fixed, so the
direct effects of all components plus bias terms sum exactly to the metric. A final-logit
soft-cap (Gemma 2) is held fixed the same way, as the gain cap·tanh(z/cap)/z on each read logit;
under post-norms a component's write passes its post-norm's frozen gain (model.write_gain).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

from actwh.compute.model import HookedTransformer, expand_kv, write_gain
from actwh.compute.targets import TARGETS, Batch, Target, get_target
from actwh.errors import UnknownName
from actwh.ontology import NODE_TYPES  # noqa: F401  (re-exported: the registry's node types)

FINAL_GRAD = ("final_grad", "")  # a need: the direct-effect gradient at the final residual
# absent in some families: rotary models' positions, post-norm gains, the uncapped logits
OPTIONAL_SITES = {"hook_pos_embed", "blocks.{L}.ln1_post.hook_scale", "blocks.{L}.ln2_post.hook_scale",
                  "hook_logits_raw"}


class Ctx:
    """What a scalar function reads: the cache of one batch and the model's weights."""

    def __init__(self, model: HookedTransformer, batch: Batch, target: Target, cache):
        self.model, self.batch, self.target, self.cache = model, batch, target, cache
        self._g_final = None

    def a(self, site: str, layer: int | None = None) -> torch.Tensor:
        return self.cache.acts[site.format(L=layer)]

    def g(self, site: str, layer: int | None = None) -> torch.Tensor:
        return self.cache.grads[site.format(L=layer)]

    def gain(self, layer: int, sublayer: str) -> torch.Tensor | None:
        """The frozen post-norm factor on a sublayer's raw output (model.write_gain), or None."""
        return write_gain(self.model, self.cache.acts, layer, sublayer)

    def embed(self) -> torch.Tensor:
        """Token plus positional embedding: the `embed` node's write. [batch, pos, d_model]"""
        e = self.a("hook_embed")
        return e + self.a("hook_pos_embed") if "hook_pos_embed" in self.cache.acts else e

    def rows(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(batch, pos) of the positions the target reads, where g_final can be non-zero. Direct
        effects are computed there only: one row per prompt for logit targets, not all of them."""
        self.g_final()
        return self._rows

    def at_rows(self, values: torch.Tensor, width: int) -> torch.Tensor:
        """values [n_rows, width] placed at `rows()` in a zero [batch, pos, width] tensor."""
        b, p = self.batch.tokens.shape
        out = values.new_zeros(b, p, width)
        out[self._rows] = values
        return out

    def g_final(self) -> torch.Tensor:
        """∂(readout · logits)/∂resid_final with the final norm's scale frozen. [batch, pos, d_model]"""
        if self._g_final is None:
            m = self.model
            r = self.target.readout(self.cache.logits, self.batch)
            b, p = self.batch.tokens.shape
            if r.rows is not None:  # the targets know their rows: no host synchronisation
                self._rows = r.rows
            else:
                key = torch.unique(r.batch * p + r.pos)
                self._rows = (key // p, key % p)
            direction = torch.zeros(b, p, m.cfg.d_model, dtype=m.W_U.dtype, device=m.device)
            weight = r.weight * self.softcap_gain(r)
            direction.index_put_((r.batch, r.pos), weight[:, None] * m.W_U[:, r.vocab].T,
                                 accumulate=True)
            g = self.a("ln_final.hook_scale").to(direction.dtype) * m.ln_final.w * direction
            if m.cfg.norm == "layernorm":
                g = g - g.mean(-1, keepdim=True)  # the centring step is linear too
            self._g_final = g
        return self._g_final

    def softcap_gain(self, r) -> torch.Tensor:
        """Per readout entry, the final-logit soft-cap as a frozen gain: cap · tanh(z / cap) / z
        (1 at z = 0, and without a cap), so logit = gain · z is linear in the uncapped logit z,
        the way a norm's frozen scale makes it linear; direct effects then sum to the metric."""
        if not self.model.cfg.final_softcap:
            return torch.ones_like(r.weight)
        raw = self.a("hook_logits_raw")[r.batch, r.pos, r.vocab]
        capped = self.cache.logits[r.batch, r.pos, r.vocab]
        return torch.where(raw == 0, torch.ones_like(raw), capped / raw).to(r.weight.dtype)

    def vo(self, layer: int) -> torch.Tensor:
        """Each head's write per unit of attention to each key: v @ W_O. [batch, key, head, d_model]"""
        attn = self.model.blocks[layer].attn
        v = expand_kv(self.a("blocks.{L}.attn.hook_v", layer), self.model.cfg.n_heads, dim=2)
        return torch.einsum("bkhe,hed->bkhd", v, attn.W_O)


@dataclass(frozen=True)
class Scalar:
    name: str
    node_type: str  # one of NODE_TYPES
    kind: str  # "token" ([batch, pos, node] per layer) or "pair" ([batch, head, query, key])
    description: str
    needs: tuple[tuple[str, str], ...]  # (site, "fwd" | "bwd"); `{L}` = each layer; FINAL_GRAD
    fn: Callable[[Ctx, int], torch.Tensor]  # (ctx, layer) -> tensor of `kind`'s shape
    embed_level: bool = False  # one value per position at layer -1 instead of one per block
    sae_level: bool = False  # one slot per spliced autoencoder (its layer) instead of per block
    token_form: bool = True  # pair scalars: also stored per query position, summed over keys


POST = "blocks.{L}.mlp.hook_post"
PATTERN = "blocks.{L}.attn.hook_pattern"
V = "blocks.{L}.attn.hook_v"
Z = "blocks.{L}.attn.hook_z"
ATTN_OUT = "blocks.{L}.hook_attn_out"
MLP_OUT = "blocks.{L}.hook_mlp_out"
EMBEDS = (("hook_embed", "fwd"), ("hook_pos_embed", "fwd"))
FINAL = (FINAL_GRAD, ("ln_final.hook_scale", "fwd"), ("hook_logits_raw", "fwd"))
EXPERT_WEIGHTS = "blocks.{L}.mlp.hook_expert_weights"
ROUTING = "blocks.{L}.mlp.hook_routing"
ATTN_GAIN = (("blocks.{L}.ln1_post.hook_scale", "fwd"),)  # post-norm families only
MLP_GAIN = (("blocks.{L}.ln2_post.hook_scale", "fwd"),)


def _dot(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return (x * y).sum(-1, keepdim=True)


def _gained(g: torch.Tensor, gain: torch.Tensor | None) -> torch.Tensor:
    return g if gain is None else g * gain


def _head_act_times_grad(c: Ctx, L: int) -> torch.Tensor:
    # result_h · grad(attn_out): grad pulled back through W_O, then dotted with z. [b, q, h]
    g = _gained(c.g(ATTN_OUT, L), c.gain(L, "attn"))
    back = torch.einsum("bqd,hed->bqhe", g, c.model.blocks[L].attn.W_O)
    return (c.a(Z, L) * back).sum(-1)


def _rows_times(c: Ctx, acts: torch.Tensor, W_write: torch.Tensor,
                gain: torch.Tensor | None = None) -> torch.Tensor:
    """acts · (g_final @ W_writeᵀ) for nodes writing rows of W_write (through a post-norm's
    frozen gain when there is one), at the target's rows only."""
    rows = c.rows()
    g = c.g_final()[rows]  # [n, d_model]
    if gain is not None:
        g = g * gain[rows]
    return c.at_rows(acts[rows] * (g @ W_write.T), W_write.shape[0])


def _mlp_write_norm(c: Ctx, L: int) -> torch.Tensor:
    W_out, gain = c.model.blocks[L].mlp.W_out, c.gain(L, "mlp")
    if gain is None:
        return c.a(POST, L).abs() * W_out.norm(dim=-1)
    return c.a(POST, L).abs() * torch.einsum("nd,bpd->bpn", W_out.square(), gain.square()).sqrt()


def _attn_write_norm(c: Ctx, L: int) -> torch.Tensor:
    vo, gain = c.vo(L), c.gain(L, "attn")  # [b, k, h, d]
    if gain is None:
        norm = vo.norm(dim=-1).permute(0, 2, 1)[:, :, None, :]  # [b, h, 1, k]
    else:  # the write lands at the query, through the query position's gain
        norm = torch.einsum("bkhd,bqd->bhqk", vo.square(), gain.square()).sqrt()
    return c.a(PATTERN, L) * norm


def _per_expert(c: Ctx, L: int, per_neuron: torch.Tensor) -> torch.Tensor:
    """Sum neuron values [b, p, neurons] over each expert's neurons: [b, p, experts]."""
    mlp = c.model.blocks[L].mlp
    out = per_neuron.new_zeros(*per_neuron.shape[:-1], c.model.cfg.n_mlp_nodes)
    return out.index_add_(-1, mlp.expert_of, per_neuron)


def _expert_act_times_grad(c: Ctx, L: int) -> torch.Tensor:
    # each expert's write (its neurons' routed, weighted writes) · ∂target/∂(MLP output)
    g = _gained(c.g(MLP_OUT, L), c.gain(L, "mlp"))
    return _per_expert(c, L, c.a(POST, L) * (g @ c.model.blocks[L].mlp.W_out.T))


def _expert_direct_effect(c: Ctx, L: int) -> torch.Tensor:
    mlp = c.model.blocks[L].mlp
    per_neuron = _rows_times(c, c.a(POST, L), mlp.W_out, c.gain(L, "mlp"))
    return _per_expert(c, L, per_neuron)


def _router_prob(c: Ctx, L: int) -> torch.Tensor:
    probs = c.a(EXPERT_WEIGHTS, L).to(c.model.W_E.dtype)
    if c.model.cfg.d_shared:  # the shared expert is not routed: its sigmoid gate
        probs = torch.cat([probs, c.a(ROUTING, L)[..., -1:]], -1)
    return probs


def _attn_direct_effect(c: Ctx, L: int) -> torch.Tensor:
    # pattern[q, k] · (v_k W_O) · g[q], with g pulled back through W_O first (non-zero only at
    # the rows the target reads), then one batched matmul over (batch, head): gathering v per
    # read row instead would copy v once per row, b·p times for the loss target.
    attn, rows = c.model.blocks[L].attn, c.rows()
    v = expand_kv(c.a(V, L), c.model.cfg.n_heads, dim=2)
    b, p, h, e = v.shape
    back = v.new_zeros(b, p, h, e)  # [b, q, head, d_head]
    back[rows] = torch.einsum("hed,nd->nhe", attn.W_O, _gained(c.g_final(), c.gain(L, "attn"))[rows])
    return torch.einsum("bkhe,bqhe->bhqk", v, back) * c.a(PATTERN, L)  # [b, h, q, k]


SCALARS: dict[str, Scalar] = {s.name: s for s in [
    Scalar("mlp_post_act", "mlp_neuron", "token", "MLP neuron activation (after the nonlinearity)",
           ((POST, "fwd"),), lambda c, L: c.a(POST, L)),
    Scalar("mlp_write_norm", "mlp_neuron", "token",
           "norm of the neuron's write to the residual stream: |act| · ||W_out row|| (through "
           "the post-norm's frozen gain where there is one)",
           ((POST, "fwd"), *MLP_GAIN), _mlp_write_norm),
    Scalar("mlp_direct_effect", "mlp_neuron", "token",
           "neuron write · target gradient at the final residual (final norm scale frozen)",
           ((POST, "fwd"), *MLP_GAIN, *FINAL),
           lambda c, L: _rows_times(c, c.a(POST, L), c.model.blocks[L].mlp.W_out, c.gain(L, "mlp"))),
    Scalar("mlp_act_times_grad", "mlp_neuron", "token",
           "neuron activation × ∂target/∂activation", ((POST, "fwd"), (POST, "bwd")),
           lambda c, L: c.a(POST, L) * c.g(POST, L)),
    Scalar("attn_pattern", "attn_head", "pair", "attention probability from query to key",
           ((PATTERN, "fwd"),), lambda c, L: c.a(PATTERN, L), token_form=False),
    Scalar("attn_write_norm", "attn_head", "pair",
           "norm of what the head writes from key to query: p · ||v W_O|| (token: summed over keys)",
           ((PATTERN, "fwd"), (V, "fwd"), *ATTN_GAIN), _attn_write_norm),
    Scalar("attn_direct_effect", "attn_head", "pair",
           "head write from key to query · final-residual target gradient (token: the head's "
           "whole direct effect)", ((PATTERN, "fwd"), (V, "fwd"), *ATTN_GAIN, *FINAL),
           _attn_direct_effect),
    Scalar("attn_act_times_grad", "attn_head", "pair",
           "attention probability × ∂target/∂probability (token: summed over keys)",
           ((PATTERN, "fwd"), (PATTERN, "bwd")), lambda c, L: c.a(PATTERN, L) * c.g(PATTERN, L)),
    Scalar("attn_head_act_times_grad", "attn_head", "token",
           "the head's whole output · ∂target/∂attention output (component graph node)",
           ((Z, "fwd"), (ATTN_OUT, "bwd"), *ATTN_GAIN), _head_act_times_grad),
    Scalar("mlp_layer_direct_effect", "mlp", "token",
           "the MLP layer's output (bias included) · final-residual target gradient",
           ((MLP_OUT, "fwd"), *FINAL), lambda c, L: _dot(c.a(MLP_OUT, L), c.g_final())),
    Scalar("mlp_layer_act_times_grad", "mlp", "token",
           "the MLP layer's output · ∂target/∂output (component graph node)",
           ((MLP_OUT, "fwd"), (MLP_OUT, "bwd")), lambda c, L: _dot(c.a(MLP_OUT, L), c.g(MLP_OUT, L))),
    Scalar("embed_direct_effect", "embed", "token",
           "token + position embedding · final-residual target gradient",
           (*EMBEDS, *FINAL), lambda c, L: _dot(c.embed(), c.g_final()), embed_level=True),
    Scalar("token_attribution", "embed", "token",
           "token + position embedding · ∂target/∂embedding (act × grad of the input)",
           (*EMBEDS, ("hook_embed", "bwd")), lambda c, L: _dot(c.embed(), c.g("hook_embed")),
           embed_level=True),
]}



def _sae(c: Ctx, slot: int):
    from actwh.compute.sae import spliced

    return spliced(c.model)[slot]


LATENTS = "{S}.hook_latents"  # S: the autoencoder's prefix (`<site>.sae`, `blocks.L.transcoder`)
ERROR = "{S}.hook_error"


def _latents(c: Ctx, slot: int) -> torch.Tensor:
    return c.cache.acts[LATENTS.format(S=_sae(c, slot).info.prefix)]


SAE_SCALARS = [
    Scalar("sae_latent_act", "sae_latent", "token", "sparse autoencoder latent activation",
           ((LATENTS, "fwd"),), _latents, sae_level=True),
    Scalar("sae_write_norm", "sae_latent", "token",
           "norm of the latent's write: |act| · ||W_dec row||", ((LATENTS, "fwd"),),
           lambda c, i: _latents(c, i).abs() * _sae(c, i).W_dec.norm(dim=-1), sae_level=True),
    Scalar("sae_direct_effect", "sae_latent", "token",
           "latent write · final-residual target gradient (final norm scale frozen)",
           ((LATENTS, "fwd"), *FINAL),
           lambda c, i: _rows_times(c, _latents(c, i), _sae(c, i).W_dec), sae_level=True),
    Scalar("sae_act_times_grad", "sae_latent", "token", "latent activation × ∂target/∂activation",
           ((LATENTS, "fwd"), (LATENTS, "bwd")),
           lambda c, i: _latents(c, i) * c.cache.grads[LATENTS.format(S=_sae(c, i).info.prefix)],
           sae_level=True),
    Scalar("sae_error_act_times_grad", "sae_error", "token",
           "the autoencoder's error (x − reconstruction) · ∂target/∂error",
           ((ERROR, "fwd"), (ERROR, "bwd")),
           lambda c, i: _dot(c.cache.acts[ERROR.format(S=_sae(c, i).info.prefix)],
                             c.cache.grads[ERROR.format(S=_sae(c, i).info.prefix)]), sae_level=True),
]
SCALARS.update({s.name: s for s in SAE_SCALARS})


def _attribution_scalars():
    from actwh.compute.attribution import attribution_scalars

    return attribution_scalars()


SCALARS.update({s.name: s for s in _attribution_scalars()})  # compute/attribution.py

# Mixture of experts: node index = expert (the shared expert, if any, last). An expert's neurons
# are `mlp_neuron` nodes with index expert · d_mlp + neuron (models.d_mlp is one expert's width).
EXPERT_SCALARS = [
    Scalar("expert_act_times_grad", "mlp_expert", "token",
           "the expert's write (its routed, weighted output) · ∂target/∂MLP output",
           ((POST, "fwd"), (MLP_OUT, "bwd"), *MLP_GAIN), _expert_act_times_grad),
    Scalar("expert_direct_effect", "mlp_expert", "token",
           "the expert's write · final-residual target gradient (final norm scale frozen)",
           ((POST, "fwd"), *MLP_GAIN, *FINAL), _expert_direct_effect),
    Scalar("router_prob", "mlp_expert", "token",
           "the router's softmax probability of the expert for this token (the shared expert: "
           "its sigmoid gate)", ((EXPERT_WEIGHTS, "fwd"), (ROUTING, "fwd")), _router_prob),
]
SCALARS.update({s.name: s for s in EXPERT_SCALARS})

# How nodes of each type are ranked when a selection names another type's scalar.
RANKING = {"mlp_neuron": "mlp_act_times_grad", "attn_head": "attn_act_times_grad",
           "mlp": "mlp_layer_act_times_grad", "embed": "token_attribution",
           "sae_latent": "sae_act_times_grad", "sae_error": "sae_error_act_times_grad",
           "mlp_expert": "expert_act_times_grad"}


def get_scalar(name: str) -> Scalar:
    if name not in SCALARS:
        raise UnknownName("scalar", name, SCALARS)
    return SCALARS[name]


@dataclass(frozen=True)
class Plan:
    """The sites (and pass types) one request needs, and nothing else."""

    scalars: tuple[str, ...]
    fwd: frozenset[str]
    bwd: frozenset[str]
    final_grad: bool

    @classmethod
    def make(cls, model: HookedTransformer, names) -> Plan:
        scalars = tuple(dict.fromkeys(get_scalar(n).name for n in names))
        fwd, bwd, final = set(), set(), False
        for s in map(SCALARS.get, scalars):
            if s.node_type == "mlp_expert" and not model.cfg.n_experts:
                continue  # no experts, no values (like SAE scalars without an autoencoder)
            for site, kind in s.needs:
                if (site, kind) == FINAL_GRAD:
                    final = True
                    continue
                if "{S}" in site:
                    from actwh.compute.sae import spliced

                    names = [site.format(S=sae.info.prefix) for sae in spliced(model)]
                else:
                    layers = range(model.cfg.n_layers) if "{L}" in site else [None]
                    names = [site.format(L=L) for L in layers]
                for name in names:
                    if site in OPTIONAL_SITES and name not in model.hook_points:
                        continue
                    (fwd if kind == "fwd" else bwd).add(name)
        return cls(scalars, frozenset(fwd), frozenset(bwd), final)


@dataclass
class ScalarResults:
    """Dense results of one batch; selection and flattening to columns happen downstream."""

    token: dict[str, torch.Tensor]  # name -> [batch, pos, n_layers (1 for embed), n_nodes]
    pair: dict[str, torch.Tensor]  # name -> [batch, n_layers, head, query, key]
    metric: torch.Tensor  # [batch] the target's value per prompt
    loss: torch.Tensor  # [batch] mean next-token cross-entropy per prompt
    mask: torch.Tensor  # [batch, pos]
    plan: Plan = field(repr=False)
    completeness: dict = field(default_factory=dict)  # attribution sums and Δmetric [batch]


def detach_ln_hooks(model: HookedTransformer):
    """Forward hooks that freeze every norm's scale (no gradient flows through it)."""
    return [(n, lambda t, _n: t.detach()) for n in model.hook_points if n.endswith("hook_scale")]


def compute_scalars(model: HookedTransformer, batch: Batch, target: str | Target, names,
                    detach_ln: bool = False, node_baseline="zero", ig_steps: int = 0) -> ScalarResults:
    """Run one forward (and, if any scalar needs gradients, one backward) pass and derive `names`.

    `*_attribution` scalars take their own passes (compute/attribution.py) with `node_baseline`
    ("zero", corrupted token ids or per-position means) and `ig_steps`."""
    target = get_target(target) if isinstance(target, str) else target
    plan = Plan.make(model, names)
    batch = batch.to(model.device)
    fwd = sorted(plan.fwd | ({"ln_final.hook_scale"} if plan.final_grad else set()))
    cache = model.run_with_cache(
        batch.tokens, fwd, attention_mask=batch.mask,
        backward_of=(lambda logits: target.metric(logits, batch).sum()) if plan.bwd else None,
        grad_names=sorted(plan.bwd), fwd_hooks=detach_ln_hooks(model) if detach_ln else ())
    ctx = Ctx(model, batch, target, cache)
    from actwh.compute.attribution import ATTRIBUTIONS, node_attributions

    wanted = [n for n in plan.scalars if n in ATTRIBUTIONS]
    completeness: dict = {}
    ctx.attributions = node_attributions(model, batch, target, wanted, node_baseline,
                                         ig_steps, completeness) if wanted else {}
    token, pair = {}, {}
    with torch.no_grad():
        for name in plan.scalars:
            s = SCALARS[name]
            if s.embed_level:
                token[name] = s.fn(ctx, -1)[:, :, None, :]
                continue
            if s.node_type == "mlp_expert" and not model.cfg.n_experts:
                continue
            if s.sae_level:
                from actwh.compute.sae import spliced

                n_saes = len(spliced(model))
                if n_saes:
                    token[name] = torch.stack([s.fn(ctx, i) for i in range(n_saes)], dim=2)
                continue
            per_layer = torch.stack([s.fn(ctx, L) for L in range(model.cfg.n_layers)], dim=1)
            if s.kind == "pair":
                pair[name] = per_layer
                if s.token_form:  # [b, L, h, q, k] -> [b, q, L, h]
                    token[name] = per_layer.sum(-1).permute(0, 3, 1, 2)
            else:
                token[name] = per_layer.permute(0, 2, 1, 3)  # [b, L, p, n] -> [b, p, L, n]
        metric = target.metric(cache.logits, batch)
        loss = TARGETS["loss"].metric(cache.logits, batch)
    return ScalarResults(token, pair, metric, loss, batch.mask, plan, completeness)
