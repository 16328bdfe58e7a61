"""One hooked decoder for GPT-2, GPT-NeoX/Pythia, the Llama family (Llama 2/3.x, Mistral, Qwen2/2.5,
Qwen3, Phi-3), Gemma 2/3 and OLMo 2.

Read top to bottom: config, rotary frequencies, hook points, norms, attention, MLP, block, model.
Families differ only by switches in the frozen `ModelConfig`: norm placement (pre, post or both),
q/k norms, soft-capping, local/global layers with their own RoPE, gated MLPs. Every hook site is
an identity `HookPoint` named by its module path (TransformerLens names), so
`blocks.3.attn.hook_pattern` is both the Python name and the string users write in SQL. Sites
cost nothing unless a caller attaches to them, and hooks are attached only inside `hooks()`,
which removes every handle in `finally` and can span a backward pass.

Parameters are frozen: actwh needs gradients with respect to activations, never weights, so a
backward pass skips the weight-gradient work a plain `loss.backward()` would do.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterable, Sequence

import torch
from torch import nn

from actwh.errors import PromptError, UnknownName

HookFn = Callable[[torch.Tensor, str], "torch.Tensor | None"]


def plus_bias(module: nn.Module, t: torch.Tensor, name: str) -> torch.Tensor:
    """t + module.<name>, skipped for a bias the checkpoint lacks (`absent_biases`: it is zero,
    and adding zeros costs a pass over t, in the backward pass too)."""
    return t if name in module.absent_biases else t + getattr(module, name)


@dataclass(frozen=True)
class Rope:
    """One layer type's rotary embedding, as transformers' modeling_rope_utils computes it.

    `frequencies` reproduces the `rope_type`s transformers ships for these families: default,
    linear (positions / factor), dynamic (NTK; transformers rescales only past
    max_position_embeddings, which actwh refuses, so inside the context it is the default),
    yarn, longrope (short factors, or long ones once a batch's longest position passes
    original_max, as transformers picks them per forward pass) and llama3.
    """

    type: str = "default"
    theta: float = 10000.0
    dim: int = 0  # rotated dims per head (partial rotary: fewer than d_head)
    factor: float = 1.0
    original_max: int = 0  # original_max_position_embeddings (llama3, yarn, longrope)
    low_freq_factor: float = 1.0  # llama3
    high_freq_factor: float = 4.0  # llama3
    beta_fast: float = 32.0  # yarn
    beta_slow: float = 1.0  # yarn
    truncate: bool = True  # yarn
    attention_factor: float = 1.0  # multiplies cos and sin (yarn, longrope)
    short_factor: tuple[float, ...] = ()  # longrope
    long_factor: tuple[float, ...] = ()  # longrope

    def frequencies(self, seq_len: int, device=None) -> torch.Tensor:
        """inv_freq [dim / 2] for a forward pass whose longest position is seq_len - 1."""
        dim, base = self.dim, self.theta
        exponents = torch.arange(0, dim, 2, dtype=torch.int64, device=device).float() / dim
        if self.type == "longrope":
            long = seq_len > self.original_max
            ext = torch.tensor(self.long_factor if long else self.short_factor, device=device)
            return 1.0 / (ext * base ** exponents)
        inv_freq = 1.0 / (base ** exponents)
        if self.type == "linear":
            return inv_freq / self.factor
        if self.type == "llama3":  # long wavelengths slowed by factor, a smooth ramp between
            old, f = self.original_max, self.factor
            wavelen = 2 * math.pi / inv_freq
            slow = torch.where(wavelen > old / self.low_freq_factor, inv_freq / f, inv_freq)
            smooth = (old / wavelen - self.low_freq_factor) / (self.high_freq_factor - self.low_freq_factor)
            smoothed = (1 - smooth) * slow / f + smooth * slow
            medium = ~(wavelen < old / self.high_freq_factor) * ~(wavelen > old / self.low_freq_factor)
            return torch.where(medium, smoothed, slow)
        if self.type == "yarn":  # interpolate low frequencies, extrapolate high ones, ramp between
            def correction_dim(rotations):
                return dim * math.log(self.original_max / (rotations * 2 * math.pi)) / (2 * math.log(base))
            low, high = correction_dim(self.beta_fast), correction_dim(self.beta_slow)
            if self.truncate:
                low, high = math.floor(low), math.ceil(high)
            low, high = max(low, 0), min(high, dim - 1)
            if low == high:
                high += 0.001
            ramp = ((torch.arange(dim // 2, dtype=torch.float32, device=device) - low) / (high - low)).clamp(0, 1)
            extrapolation = 1 - ramp
            pos_freqs = base ** exponents
            return (1.0 / (self.factor * pos_freqs)) * (1 - extrapolation) + (1.0 / pos_freqs) * extrapolation
        return inv_freq  # default, dynamic


@dataclass(frozen=True)
class ModelConfig:
    arch: str  # the checkpoint's model_type ("gpt2", "llama", "gemma2", ...; loading.SUPPORTED)
    n_layers: int
    d_model: int
    n_heads: int
    n_kv_heads: int  # key/value heads; fewer than n_heads means grouped-query attention
    d_head: int
    d_mlp: int
    d_vocab: int
    n_ctx: int  # longest sequence accepted
    norm: str = "layernorm"  # "layernorm" (centred, with bias) or "rmsnorm" (Llama family)
    norm_eps: float = 1e-5  # added to the variance before the inverse square root
    act: str = "gelu_new"  # a key of transformers' ACT2FN (the checkpoint's own activation)
    rotary_dim: int = 0  # rotated dims per head; 0 means learned absolute positions (GPT-2)
    rope: Rope = Rope()  # global (full-attention) layers' rotary embedding
    rope_local: Rope | None = None  # sliding-window layers' own RoPE (Gemma 3); None: `rope`
    parallel: bool = False  # GPT-NeoX: attention and MLP both read resid_pre
    gated_mlp: bool = False  # Llama family: down(act(gate(x)) * up(x))
    sliding_window: int | None = None  # a query sees at most this many keys back ...
    layer_types: tuple[str, ...] = ()  # ... in "sliding_attention" layers ("full_attention"
    # elsewhere); empty: every layer (Mistral, Phi-3) when there is a window
    pre_norm: bool = True  # ln1/ln2 before each sublayer; OLMo 2 has none (identity norms)
    post_norm: bool = False  # ln1_post/ln2_post on each sublayer's output (Gemma 2/3, OLMo 2)
    qk_norm: str | None = None  # RMSNorm of q and k: "head" (over d_head, Qwen3, Gemma 3) or
    # "all" (over all heads together, OLMo 2), before rotary
    embed_scale: float = 1.0  # token embeddings × this, in their dtype (Gemma: √d_model)
    attn_scalar: float | None = None  # scores / √attn_scalar (Gemma's query_pre_attn_scalar)
    attn_softcap: float | None = None  # scores → cap · tanh(scores / cap) (Gemma 2)
    final_softcap: float | None = None  # logits → cap · tanh(logits / cap) (Gemma 2)
    # Mixture of experts (every layer): d_mlp is one expert's width. The experts' neurons are
    # stored side by side as one wide gated MLP (neuron index = expert · d_mlp + neuron; the
    # shared expert, if any, is expert n_experts, its neurons from n_experts · d_mlp on).
    n_experts: int = 0  # routed experts; 0 means a dense MLP
    top_k: int = 0  # experts per token
    norm_topk_prob: bool = False  # renormalise the top-k probabilities to sum to 1 (Mixtral: always)
    d_shared: int = 0  # the shared expert's width, gated by sigmoid(x · w) (Qwen2-MoE); 0: none

    @property
    def n_mlp_nodes(self) -> int:
        """Component-graph nodes per MLP layer: the layer, or each expert (shared one last)."""
        return self.n_experts + (1 if self.d_shared else 0) if self.n_experts else 1

    @property
    def d_neurons(self) -> int:
        """Neurons per MLP layer (all experts', side by side)."""
        return self.n_experts * self.d_mlp + self.d_shared if self.n_experts else self.d_mlp

    def is_sliding(self, layer: int) -> bool:
        if self.sliding_window is None:
            return False
        return not self.layer_types or self.layer_types[layer] == "sliding_attention"


class HookPoint(nn.Module):
    """Identity; a place to attach forward and backward hooks. `name` is the full module path.

    A sparse autoencoder spliced here (compute/sae.py) becomes its child `sae`, and the site's
    value becomes the autoencoder's exact reconstruction (latents + error)."""

    name: str = ""

    def __init__(self):
        super().__init__()
        self.sae = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.sae is None else self.sae(x)


class Norm(nn.Module):
    """LayerNorm or RMSNorm with its scale (1/sqrt(var + eps)) exposed, so it can be frozen.

    kind "none" is the identity (OLMo 2 has no pre-norms): scale 1, w 1, b 0, so code that
    pulls gradients back through ln1/ln2 needs no branch. Gemma's (1 + w) weights are stored as
    1 + w at load time, so every RMSNorm here is w ⊙ normalized."""

    def __init__(self, cfg: ModelConfig, size: int | None = None, kind: str | None = None):
        super().__init__()
        size = size or cfg.d_model
        self.kind = kind or cfg.norm
        self.rms = self.kind == "rmsnorm"
        self.eps = cfg.norm_eps
        if self.kind == "none":
            self.register_buffer("w", torch.ones(size), persistent=False)
            self.register_buffer("b", torch.zeros(size), persistent=False)
        else:
            self.w = nn.Parameter(torch.ones(size))
            self.b = nn.Parameter(torch.zeros(size))  # stays zero for RMSNorm
        self.hook_scale = HookPoint()  # [batch, pos, 1] ([batch, pos, head, 1] for per-head q/k)
        self.hook_normalized = HookPoint()  # [batch, pos, size]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "none":  # a new tensor (a view), so its gradient is this reader's alone
            self.hook_scale(x.new_ones(x.shape[:-1] + (1,)))
            return self.hook_normalized(x.view_as(x))
        dtype = x.dtype
        x = x.to(torch.promote_types(dtype, torch.float32))  # never below float32, as in HF
        if not self.rms:
            x = x - x.mean(-1, keepdim=True)
        scale = self.hook_scale(torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps))
        normalized = self.hook_normalized((x * scale).to(dtype))
        if self.rms:
            return self.w * normalized
        return normalized * self.w + self.b


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding on the first cos.shape[-1] dims of each head (GPT-NeoX/Llama halves)."""
    rd = cos.shape[-1]
    xr, xpass = x[..., :rd], x[..., rd:]
    x1, x2 = xr[..., : rd // 2], xr[..., rd // 2:]
    rotated = torch.cat((-x2, x1), dim=-1)
    if rd == x.shape[-1]:  # every dim rotated: no copy onto an empty remainder
        return xr * cos + rotated * sin
    return torch.cat((xr * cos + rotated * sin, xpass), dim=-1)


def expand_kv(t: torch.Tensor, n_heads: int, dim: int) -> torch.Tensor:
    """Grouped-query attention: each key/value head repeated for the query heads that share it,
    so t's head dimension `dim` goes from n_kv_heads to n_heads (query head h reads kv head
    h // (n_heads // n_kv_heads))."""
    group = n_heads // t.shape[dim]
    return t.repeat_interleave(group, dim=dim) if group > 1 else t


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int = 0):
        super().__init__()
        h, kv, d, e = cfg.n_heads, cfg.n_kv_heads, cfg.d_model, cfg.d_head
        self.cfg = cfg
        self.sliding = cfg.is_sliding(layer)
        self.W_Q = nn.Parameter(torch.empty(h, d, e))
        self.W_K = nn.Parameter(torch.empty(kv, d, e))
        self.W_V = nn.Parameter(torch.empty(kv, d, e))
        self.W_O = nn.Parameter(torch.empty(h, e, d))
        # Biases are always present (zeros where a family has none) so code never branches.
        self.b_Q = nn.Parameter(torch.zeros(h, e))
        self.b_K = nn.Parameter(torch.zeros(kv, e))
        self.b_V = nn.Parameter(torch.zeros(kv, e))
        self.b_O = nn.Parameter(torch.zeros(d))
        self.absent_biases: frozenset[str] = frozenset()  # see HookedTransformer.mark_absent_biases
        self.hook_q = HookPoint()  # [batch, pos, head, d_head] (before rotary)
        self.hook_k = HookPoint()  # [batch, pos, kv_head, d_head] (before rotary)
        self.hook_v = HookPoint()  # [batch, pos, kv_head, d_head]
        self.hook_attn_scores = HookPoint()  # [batch, head, query_pos, key_pos], masked = -inf
        self.hook_pattern = HookPoint()  # [batch, head, query_pos, key_pos]
        self.hook_z = HookPoint()  # [batch, pos, head, d_head]
        if cfg.qk_norm:  # hook_q/hook_k stay the projections (linear in x); the norms follow
            per_head = cfg.qk_norm == "head"
            self.q_norm = Norm(cfg, e if per_head else h * e, "rmsnorm")
            self.k_norm = Norm(cfg, e if per_head else kv * e, "rmsnorm")

    def forward(self, x, mask, cos, sin):
        q = self.hook_q(plus_bias(self, torch.einsum("bpd,hde->bphe", x, self.W_Q), "b_Q"))
        k = self.hook_k(plus_bias(self, torch.einsum("bpd,hde->bphe", x, self.W_K), "b_K"))
        v = self.hook_v(plus_bias(self, torch.einsum("bpd,hde->bphe", x, self.W_V), "b_V"))
        z = self.attend(q, k, v, mask, cos, sin)
        return plus_bias(self, z.flatten(2) @ self.W_O.flatten(0, 1), "b_O")  # [batch, pos, d_model]

    def attend(self, q, k, v, mask, cos, sin, kv_of: torch.Tensor | None = None) -> torch.Tensor:
        """z [batch, pos, heads, d_head] from the projections (before q/k norms and rotary).

        q holds every query head and k, v every key/value head; or, with `kv_of`, q holds some
        query heads, k and v some key/value heads and kv_of[i] is the index in k/v of query head
        i's key/value head (patching computes only the heads a circuit needs; not with
        qk_norm "all", which normalises across every head)."""
        cfg = self.cfg
        if cfg.qk_norm == "head":
            q, k = self.q_norm(q), self.k_norm(k)
        elif cfg.qk_norm == "all":
            q, k = self.q_norm(q.flatten(2)).view_as(q), self.k_norm(k.flatten(2)).view_as(k)
        if cfg.rotary_dim:
            q, k = rotate(q, cos, sin), rotate(k, cos, sin)
        if kv_of is None:
            k, v = expand_kv(k, cfg.n_heads, dim=2), expand_kv(v, cfg.n_heads, dim=2)
        else:
            k, v = k[:, :, kv_of], v[:, :, kv_of]
        scores = torch.einsum("bqhe,bkhe->bhqk", q, k) / math.sqrt(cfg.attn_scalar or cfg.d_head)
        if cfg.attn_softcap:
            scores = torch.tanh(scores / cfg.attn_softcap) * cfg.attn_softcap
        scores = self.hook_attn_scores(scores.masked_fill(mask, float("-inf")))  # mask: hidden keys
        wide = torch.promote_types(q.dtype, torch.float32)  # softmax never below float32
        pattern = self.hook_pattern(scores.to(wide).softmax(-1).to(q.dtype))
        return self.hook_z(torch.einsum("bhqk,bkhe->bqhe", pattern, v))


FUSED_ACTIVATIONS = {"gelu_new": "gelu_pytorch_tanh"}


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        from transformers.activations import ACT2FN

        # GPT-2's gelu_new is the tanh-approximate GELU written as eight elementwise ops (and as
        # many in the backward pass); PyTorch's fused kernel computes the same function to within
        # float32 rounding (≤ 5e-7 here); a GPT-2-small act × grad step is ~9% faster with it.
        self.act = ACT2FN[FUSED_ACTIVATIONS.get(cfg.act, cfg.act)]
        self.gated = cfg.gated_mlp
        self.cfg = cfg
        n = cfg.d_neurons  # d_mlp, or every expert's neurons side by side
        self.W_in = nn.Parameter(torch.empty(cfg.d_model, n))  # the gate in gated MLPs
        self.b_in = nn.Parameter(torch.zeros(n))
        self.W_out = nn.Parameter(torch.empty(n, cfg.d_model))
        self.b_out = nn.Parameter(torch.zeros(cfg.d_model))
        self.absent_biases: frozenset[str] = frozenset()  # see HookedTransformer.mark_absent_biases
        self.hook_pre = HookPoint()  # [batch, pos, d_mlp] (the gate's input in gated MLPs)
        self.hook_post = HookPoint()  # [batch, pos, d_mlp] (mixture of experts: routed, weighted)
        if self.gated:
            self.W_up = nn.Parameter(torch.empty(cfg.d_model, n))
            self.b_up = nn.Parameter(torch.zeros(n))
            self.hook_pre_linear = HookPoint()  # [batch, pos, d_mlp] (the up projection)
        if cfg.n_experts:
            self.W_router = nn.Parameter(torch.empty(cfg.d_model, cfg.n_experts))
            if cfg.d_shared:
                self.W_shared_gate = nn.Parameter(torch.empty(cfg.d_model, 1))
            self.register_buffer("expert_of", self.expert_map(), persistent=False)  # [neurons] -> expert
            self.hook_router_logits = HookPoint()  # [batch, pos, n_experts]
            self.hook_expert_weights = HookPoint()  # [batch, pos, n_experts] router softmax
            self.hook_routing = HookPoint()  # [batch, pos, n_mlp_nodes] each expert's weight
            # (0 where not routed; the shared expert's sigmoid gate last)

    def expert_map(self) -> torch.Tensor:
        """The expert of each neuron (on the CPU, even while the model is built on the meta device)."""
        cfg = self.cfg
        widths = torch.tensor([cfg.d_mlp] * cfg.n_experts + ([cfg.d_shared] if cfg.d_shared else []),
                              device="cpu")
        return torch.repeat_interleave(torch.arange(len(widths), device="cpu"), widths)

    def route(self, x: torch.Tensor) -> torch.Tensor:
        """Each expert's weight per token, as transformers routes: softmax over the router logits
        (never below float32), the top-k kept (renormalised to sum 1 if norm_topk_prob), the rest 0; the
        shared expert's weight is sigmoid(x · w). [batch, pos, n_mlp_nodes]"""
        cfg = self.cfg
        logits = self.hook_router_logits(x @ self.W_router)
        probs = self.hook_expert_weights(logits.to(torch.promote_types(x.dtype, torch.float32)).softmax(-1))
        top, idx = probs.topk(cfg.top_k, dim=-1)
        if cfg.norm_topk_prob:
            top = top / top.sum(-1, keepdim=True)
        weights = torch.zeros_like(probs).scatter(-1, idx, top).to(x.dtype)
        if cfg.d_shared:
            weights = torch.cat([weights, torch.sigmoid(x @ self.W_shared_gate)], -1)
        return self.hook_routing(weights)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pre = self.hook_pre(plus_bias(self, x @ self.W_in, "b_in"))
        if self.gated:
            post = self.act(pre) * self.hook_pre_linear(plus_bias(self, x @ self.W_up, "b_up"))
        else:
            post = self.act(pre)
        if self.cfg.n_experts:  # every expert runs on every token; unrouted ones are weighted 0
            post = post * self.route(x)[..., self.expert_of]
        return plus_bias(self, self.hook_post(post) @ self.W_out, "b_out")  # [batch, pos, d_model]

    def expert_writes(self, post: torch.Tensor) -> torch.Tensor:
        """Each expert's write (its routed, weighted output) from hook_post: the sum of its
        neurons' writes. [batch, pos, n_mlp_nodes, d_model]; Σ over experts = the MLP's output."""
        cfg = self.cfg
        E, n = cfg.n_experts, cfg.d_mlp
        routed = torch.einsum("bpen,end->bped", post[..., : E * n].unflatten(-1, (E, n)),
                              self.W_out[: E * n].unflatten(0, (E, n)))
        if not cfg.d_shared:
            return routed
        shared = post[..., E * n:] @ self.W_out[E * n:]
        return torch.cat([routed, shared[:, :, None, :]], dim=2)


class Block(nn.Module):
    """Pre-norm block; with post norms (Gemma 2/3, OLMo 2) each sublayer's output is normalised
    (ln1_post, ln2_post) before it is added, so hook_attn_out / hook_mlp_out are post-norm."""

    def __init__(self, cfg: ModelConfig, layer: int = 0):
        super().__init__()
        self.parallel = cfg.parallel
        pre = None if cfg.pre_norm else "none"
        self.ln1, self.attn = Norm(cfg, kind=pre), Attention(cfg, layer)
        self.ln2, self.mlp = Norm(cfg, kind=pre), MLP(cfg)
        self.ln1_post = Norm(cfg) if cfg.post_norm else None
        self.ln2_post = Norm(cfg) if cfg.post_norm else None
        self.hook_resid_pre = HookPoint()  # [batch, pos, d_model]
        self.hook_attn_out = HookPoint()  # [batch, pos, d_model]
        self.hook_resid_mid = HookPoint()  # [batch, pos, d_model]
        self.hook_mlp_out = HookPoint()  # [batch, pos, d_model]
        self.hook_resid_post = HookPoint()  # [batch, pos, d_model]
        self.transcoder = None  # a spliced transcoder replaces the MLP's output (compute/sae.py)

    def forward(self, x, mask, cos, sin):
        resid_pre = self.hook_resid_pre(x)
        attn_out = self.attn(self.ln1(resid_pre), mask, cos, sin)
        if self.ln1_post is not None:
            attn_out = self.ln1_post(attn_out)
        attn_out = self.hook_attn_out(attn_out)
        resid_mid = self.hook_resid_mid(resid_pre + attn_out)
        # A parallel block's MLP reads the same residual stream its attention read.
        mlp_in = self.ln2(resid_pre if self.parallel else resid_mid)
        mlp_out = self.mlp(mlp_in)
        if self.ln2_post is not None:
            mlp_out = self.ln2_post(mlp_out)
        if self.transcoder is not None:  # it writes what hook_mlp_out holds (post-norm included)
            mlp_out = self.transcoder(mlp_in, mlp_out)
        mlp_out = self.hook_mlp_out(mlp_out)
        return self.hook_resid_post(resid_mid + mlp_out)


def post_norm_sites(model: "HookedTransformer", layer: int | str = "{L}") -> list[str]:
    """The sites `write_gain` reads (none without post norms)."""
    if not model.cfg.post_norm:
        return []
    return [f"blocks.{layer}.ln1_post.hook_scale", f"blocks.{layer}.ln2_post.hook_scale"]


def write_gain(model: "HookedTransformer", acts, layer: int, sublayer: str) -> torch.Tensor | None:
    """What a post-norm does to a sublayer's raw output, with its scale frozen: w ⊙ scale.

    [batch, pos, d_model], or None without post norms. With the scale held at its value the
    post-norm (RMSNorm, no centring, no bias) is linear, so a component's write to the residual
    stream is gain ⊙ (its raw output): head h writes gain ⊙ (z_h W_O_h), neuron n writes
    gain ⊙ (post_n W_out_n), the output bias gain ⊙ b. These writes sum exactly to hook_attn_out /
    hook_mlp_out, as without post norms; gradients at every site stay the true ones.
    sublayer: "attn" or "mlp"; acts must hold `post_norm_sites(model, layer)`."""
    if not model.cfg.post_norm:
        return None
    name = "ln1_post" if sublayer == "attn" else "ln2_post"
    norm = getattr(model.blocks[layer], name)
    scale = acts[f"blocks.{layer}.{name}.hook_scale"]
    return (scale * norm.w).to(norm.w.dtype)  # scale is float32 under bf16; gains follow the model


@dataclass
class Cache:
    """What `run_with_cache` returns: forward values and gradients of the requested sites."""

    logits: torch.Tensor  # [batch, pos, d_vocab]
    acts: dict[str, torch.Tensor]
    grads: dict[str, torch.Tensor]
    metric: torch.Tensor | None = None  # the differentiated scalar, when there was a backward


class HookedTransformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.W_E = nn.Parameter(torch.empty(cfg.d_vocab, cfg.d_model))
        self.W_pos = None if cfg.rotary_dim else nn.Parameter(torch.empty(cfg.n_ctx, cfg.d_model))
        self.hook_embed = HookPoint()  # [batch, pos, d_model]
        if not cfg.rotary_dim:
            self.hook_pos_embed = HookPoint()  # [batch, pos, d_model]
        self.blocks = nn.ModuleList(Block(cfg, L) for L in range(cfg.n_layers))
        self.ln_final = Norm(cfg)
        self.W_U = nn.Parameter(torch.empty(cfg.d_model, cfg.d_vocab))
        self.b_U = nn.Parameter(torch.zeros(cfg.d_vocab))
        self.absent_biases: frozenset[str] = frozenset()
        if cfg.final_softcap:
            self.hook_logits_raw = HookPoint()  # [batch, pos, d_vocab] before the soft-cap
        self.index_hook_points()
        self.requires_grad_(False)

    @torch.no_grad()
    def init_buffers(self) -> None:
        """Recompute the buffers no checkpoint holds (identity norms' ones and zeros, each
        neuron's expert) in place: a model built on the meta device and given storage by
        `to_empty` (compute/loading.py) has them uninitialised."""
        for m in self.modules():
            if isinstance(m, Norm) and m.kind == "none":
                m.w.fill_(1)
                m.b.fill_(0)
            elif isinstance(m, MLP) and m.cfg.n_experts:
                m.expert_of.copy_(m.expert_map())

    def mark_absent_biases(self, names: Iterable[str]) -> None:
        """Record the biases (parameter names, e.g. `blocks.0.attn.b_Q`, `b_U`) a checkpoint lacks:
        they stay zero and the forward pass skips adding them. The loader calls this; whoever
        later writes a non-zero value into one must first take it out of its module's
        `absent_biases`."""
        for name in names:
            path, _, attr = name.rpartition(".")
            module = self.get_submodule(path)
            if not hasattr(module, "absent_biases"):
                continue  # norms' biases: LayerNorm families always have them
            module.absent_biases = module.absent_biases | {attr}

    def index_hook_points(self) -> None:
        """Name every HookPoint by its module path (again after an SAE is spliced in)."""
        self.hook_points: dict[str, HookPoint] = {}
        for name, module in self.named_modules():
            if isinstance(module, HookPoint):
                module.name = name
                self.hook_points[name] = module

    @property
    def device(self) -> torch.device:
        return self.W_E.device

    def positions(self, attention_mask: torch.Tensor) -> torch.Tensor:
        """Position of each token counted over real tokens only, so left padding shifts nothing."""
        return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)

    def forward(self, tokens: torch.Tensor, attention_mask: torch.Tensor | None = None, *,
                positions: torch.Tensor | None = None):
        """Logits [batch, pos, d_vocab]; with `positions` [batch] (one per prompt), only those
        positions' logits [batch, 1, d_vocab] (the rest of the unembedding is skipped)."""
        x, masks, rot = self.embed(tokens, attention_mask)
        for block in self.blocks:
            kind = "sliding" if block.attn.sliding else "full"
            cos, sin = rot.get(kind, (None, None))
            x = block(x, masks[kind], cos, sin)
        return self.unembed(x, positions)

    def embed(self, tokens: torch.Tensor, attention_mask: torch.Tensor | None = None):
        """(the embeddings' sum [batch, pos, d_model], each layer kind's mask of hidden keys,
        each layer kind's rotary (cos, sin)): what every block reads besides the stream."""
        cfg = self.cfg
        batch, n = tokens.shape
        if n > cfg.n_ctx:
            raise PromptError(f"sequence of {n} tokens is longer than the context ({cfg.n_ctx})")
        if attention_mask is None:
            attention_mask = torch.ones_like(tokens)
        real = attention_mask.bool()
        pos = self.positions(attention_mask)
        x = self.W_E[tokens]
        if cfg.embed_scale != 1.0:  # Gemma: √d_model, rounded to the embedding dtype first
            x = x * torch.tensor(cfg.embed_scale, dtype=x.dtype)
        if torch.is_grad_enabled():
            x.requires_grad_(True)  # frozen weights: the graph starts at the embeddings
        x = self.hook_embed(x)
        rot = {}  # layer type -> (cos, sin) [batch, pos, 1, rotary_dim]
        if cfg.rotary_dim:
            for kind, rope in (("full", cfg.rope), ("sliding", cfg.rope_local or cfg.rope)):
                inv_freq = rope.frequencies(n, tokens.device)
                if rope.type == "longrope":  # long factors once the longest position passes
                    # original_max, chosen on the device (no host synchronisation)
                    long = pos.max() + 1 > rope.original_max
                    inv_freq = torch.where(long, rope.frequencies(rope.original_max + 1, tokens.device),
                                           rope.frequencies(rope.original_max, tokens.device))
                freqs = pos[..., None].float() * inv_freq
                emb = torch.cat((freqs, freqs), dim=-1)[:, :, None, :]
                rot[kind] = ((emb.cos() * rope.attention_factor).to(x.dtype),
                             (emb.sin() * rope.attention_factor).to(x.dtype))
        else:
            pos_embed = self.W_pos[pos]
            if torch.is_grad_enabled():
                pos_embed.requires_grad_(True)
            x = x + self.hook_pos_embed(pos_embed)
        if torch.is_grad_enabled() and not x.requires_grad:
            x = x.detach().requires_grad_(True)  # a hook replaced the embeddings with constants
        idx = torch.arange(n, device=tokens.device)
        causal = idx[None, :] <= idx[:, None]  # [query, key]
        eye = torch.eye(n, dtype=torch.bool, device=tokens.device)
        # Pad queries may see themselves, so no softmax row is all -inf; they are never read.
        # Each layer takes the keys it may not see (inverted once here, not once per layer).
        masks = {"full": ~((causal & real[:, None, None, :]) | eye)}
        if cfg.sliding_window is not None:
            window = causal & (idx[:, None] - idx[None, :] < cfg.sliding_window)
            masks["sliding"] = ~((window & real[:, None, None, :]) | eye)
        return x, masks, rot

    def unembed(self, x: torch.Tensor, positions: torch.Tensor | None = None) -> torch.Tensor:
        """Logits from the last residual stream [batch, pos, d_model]; with `positions` [batch],
        only those positions' [batch, 1, d_vocab]."""
        cfg = self.cfg
        if positions is not None:
            x = x[torch.arange(x.shape[0], device=x.device), positions.to(x.device)][:, None]
        logits = plus_bias(self, self.ln_final(x) @ self.W_U, "b_U")  # [batch, pos, d_vocab]
        if cfg.final_softcap:
            cap = cfg.final_softcap
            logits = torch.tanh(self.hook_logits_raw(logits) / cap) * cap
        return logits

    def hook_point(self, name: str) -> HookPoint:
        if name not in self.hook_points:
            raise UnknownName("hook site", name, self.hook_points)
        return self.hook_points[name]

    @contextmanager
    def hooks(self, fwd: Iterable[tuple[str, HookFn]] = (), bwd: Iterable[tuple[str, HookFn]] = ()):
        """Attach forward hooks (may return a replacement) and backward hooks (see the gradient).

        Every handle, including the per-tensor gradient hooks made during a forward pass, is
        removed on exit, even when a hook raises; run `.backward()` inside the block.
        """
        handles = []
        try:
            for name, fn in fwd:
                handles.append(self.hook_point(name).register_forward_hook(
                    lambda _m, _i, out, fn=fn, name=name: fn(out, name)))
            for name, fn in bwd:
                def attach(_m, _i, out, fn=fn, name=name):
                    if out.requires_grad:
                        handles.append(out.register_hook(lambda g: fn(g, name)))
                handles.append(self.hook_point(name).register_forward_hook(attach))
            yield self
        finally:
            for handle in handles:
                handle.remove()

    def run_with_cache(self, tokens: torch.Tensor, names: Sequence[str] = (), *,
                       attention_mask: torch.Tensor | None = None,
                       backward_of: Callable[[torch.Tensor], torch.Tensor] | None = None,
                       grad_names: Sequence[str] | None = None,
                       fwd_hooks: Iterable[tuple[str, HookFn]] = (),
                       positions: torch.Tensor | None = None) -> Cache:
        """Forward values of `names` and, with `backward_of(logits) -> scalar`, the gradients of
        that scalar at `grad_names` (default: `names`). Nothing else is kept. positions [batch]:
        the logits at those positions only (see `forward`)."""
        grad_names = list(names if grad_names is None else grad_names) if backward_of else []
        for name in [*names, *grad_names]:
            self.hook_point(name)
        wanted = set(names) | set(grad_names)
        kept: dict[str, torch.Tensor] = {}

        def keep(t, name):
            kept[name] = t

        with torch.set_grad_enabled(backward_of is not None), \
                self.hooks([*fwd_hooks, *((n, keep) for n in wanted)]):
            logits = self(tokens, attention_mask, positions=positions)
            metric = backward_of(logits) if backward_of else None
        grads: dict[str, torch.Tensor] = {}
        if backward_of is not None:
            live = [n for n in grad_names if kept[n].requires_grad]
            found = torch.autograd.grad(metric, [kept[n] for n in live], allow_unused=True) \
                if live else ()
            for name in grad_names:
                g = found[live.index(name)] if name in live else None
                grads[name] = torch.zeros_like(kept[name]) if g is None else g
            logits, metric = logits.detach(), metric.detach()
        acts = {n: kept[n].detach() for n in names}
        return Cache(logits, acts, grads, metric)
