"""One hooked decoder for GPT-2, GPT-NeoX/Pythia and the Llama family (Llama, Mistral, Qwen2).

Read top to bottom: config, hook points, norms, attention, MLP, block, model. Every hook site is
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


@dataclass(frozen=True)
class ModelConfig:
    arch: str  # the checkpoint's model_type ("gpt2", "gpt_neox", "llama", "mistral", "qwen2")
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
    rotary_base: float = 10000.0  # RoPE theta
    parallel: bool = False  # GPT-NeoX: attention and MLP both read resid_pre
    gated_mlp: bool = False  # Llama family: down(act(gate(x)) * up(x))
    sliding_window: int | None = None  # Mistral: a query sees at most this many keys back


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
    """LayerNorm or RMSNorm with its scale (1/sqrt(var + eps)) exposed, so it can be frozen."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.rms = cfg.norm == "rmsnorm"
        self.eps = cfg.norm_eps
        self.w = nn.Parameter(torch.ones(cfg.d_model))
        self.b = nn.Parameter(torch.zeros(cfg.d_model))  # stays zero for RMSNorm
        self.hook_scale = HookPoint()  # [batch, pos, 1]
        self.hook_normalized = HookPoint()  # [batch, pos, d_model]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
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
    return torch.cat((xr * cos + rotated * sin, xpass), dim=-1)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        h, kv, d, e = cfg.n_heads, cfg.n_kv_heads, cfg.d_model, cfg.d_head
        self.cfg = cfg
        self.W_Q = nn.Parameter(torch.empty(h, d, e))
        self.W_K = nn.Parameter(torch.empty(kv, d, e))
        self.W_V = nn.Parameter(torch.empty(kv, d, e))
        self.W_O = nn.Parameter(torch.empty(h, e, d))
        # Biases are always present (zeros where a family has none) so code never branches.
        self.b_Q = nn.Parameter(torch.zeros(h, e))
        self.b_K = nn.Parameter(torch.zeros(kv, e))
        self.b_V = nn.Parameter(torch.zeros(kv, e))
        self.b_O = nn.Parameter(torch.zeros(d))
        self.hook_q = HookPoint()  # [batch, pos, head, d_head] (before rotary)
        self.hook_k = HookPoint()  # [batch, pos, kv_head, d_head] (before rotary)
        self.hook_v = HookPoint()  # [batch, pos, kv_head, d_head]
        self.hook_attn_scores = HookPoint()  # [batch, head, query_pos, key_pos], masked = -inf
        self.hook_pattern = HookPoint()  # [batch, head, query_pos, key_pos]
        self.hook_z = HookPoint()  # [batch, pos, head, d_head]

    def forward(self, x, mask, cos, sin):
        cfg = self.cfg
        q = self.hook_q(torch.einsum("bpd,hde->bphe", x, self.W_Q) + self.b_Q)
        k = self.hook_k(torch.einsum("bpd,hde->bphe", x, self.W_K) + self.b_K)
        v = self.hook_v(torch.einsum("bpd,hde->bphe", x, self.W_V) + self.b_V)
        if cfg.rotary_dim:
            q, k = rotate(q, cos, sin), rotate(k, cos, sin)
        group = cfg.n_heads // cfg.n_kv_heads
        if group > 1:
            k, v = k.repeat_interleave(group, dim=2), v.repeat_interleave(group, dim=2)
        scores = torch.einsum("bqhe,bkhe->bhqk", q, k) / math.sqrt(cfg.d_head)
        scores = self.hook_attn_scores(scores.masked_fill(~mask, float("-inf")))
        wide = torch.promote_types(x.dtype, torch.float32)  # softmax never below float32
        pattern = self.hook_pattern(scores.to(wide).softmax(-1).to(x.dtype))
        z = self.hook_z(torch.einsum("bhqk,bkhe->bqhe", pattern, v))
        return z.flatten(2) @ self.W_O.flatten(0, 1) + self.b_O  # [batch, pos, d_model]


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
        self.W_in = nn.Parameter(torch.empty(cfg.d_model, cfg.d_mlp))  # the gate in gated MLPs
        self.b_in = nn.Parameter(torch.zeros(cfg.d_mlp))
        self.W_out = nn.Parameter(torch.empty(cfg.d_mlp, cfg.d_model))
        self.b_out = nn.Parameter(torch.zeros(cfg.d_model))
        self.hook_pre = HookPoint()  # [batch, pos, d_mlp] (the gate's input in gated MLPs)
        self.hook_post = HookPoint()  # [batch, pos, d_mlp]
        if self.gated:
            self.W_up = nn.Parameter(torch.empty(cfg.d_model, cfg.d_mlp))
            self.b_up = nn.Parameter(torch.zeros(cfg.d_mlp))
            self.hook_pre_linear = HookPoint()  # [batch, pos, d_mlp] (the up projection)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pre = self.hook_pre(x @ self.W_in + self.b_in)
        if self.gated:
            post = self.act(pre) * self.hook_pre_linear(x @ self.W_up + self.b_up)
        else:
            post = self.act(pre)
        return self.hook_post(post) @ self.W_out + self.b_out  # [batch, pos, d_model]


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.parallel = cfg.parallel
        self.ln1, self.attn, self.ln2, self.mlp = Norm(cfg), Attention(cfg), Norm(cfg), MLP(cfg)
        self.hook_resid_pre = HookPoint()  # [batch, pos, d_model]
        self.hook_attn_out = HookPoint()  # [batch, pos, d_model]
        self.hook_resid_mid = HookPoint()  # [batch, pos, d_model]
        self.hook_mlp_out = HookPoint()  # [batch, pos, d_model]
        self.hook_resid_post = HookPoint()  # [batch, pos, d_model]
        self.transcoder = None  # a spliced transcoder replaces the MLP's output (compute/sae.py)

    def forward(self, x, mask, cos, sin):
        resid_pre = self.hook_resid_pre(x)
        attn_out = self.hook_attn_out(self.attn(self.ln1(resid_pre), mask, cos, sin))
        resid_mid = self.hook_resid_mid(resid_pre + attn_out)
        # A parallel block's MLP reads the same residual stream its attention read.
        mlp_in = self.ln2(resid_pre if self.parallel else resid_mid)
        mlp_out = self.mlp(mlp_in)
        if self.transcoder is not None:
            mlp_out = self.transcoder(mlp_in, mlp_out)
        mlp_out = self.hook_mlp_out(mlp_out)
        return self.hook_resid_post(resid_mid + mlp_out)


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
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.ln_final = Norm(cfg)
        self.W_U = nn.Parameter(torch.empty(cfg.d_model, cfg.d_vocab))
        self.b_U = nn.Parameter(torch.zeros(cfg.d_vocab))
        self.index_hook_points()
        self.requires_grad_(False)

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

    def forward(self, tokens: torch.Tensor, attention_mask: torch.Tensor | None = None):
        cfg = self.cfg
        batch, n = tokens.shape
        if n > cfg.n_ctx:
            raise PromptError(f"sequence of {n} tokens is longer than the context ({cfg.n_ctx})")
        if attention_mask is None:
            attention_mask = torch.ones_like(tokens)
        real = attention_mask.bool()
        pos = self.positions(attention_mask)
        x = self.W_E[tokens]
        if torch.is_grad_enabled():
            x.requires_grad_(True)  # frozen weights: the graph starts at the embeddings
        x = self.hook_embed(x)
        cos = sin = None
        if cfg.rotary_dim:
            inv_freq = 1.0 / cfg.rotary_base ** (
                torch.arange(0, cfg.rotary_dim, 2, device=tokens.device).float() / cfg.rotary_dim)
            freqs = pos[..., None].float() * inv_freq  # [batch, pos, rotary_dim / 2]
            emb = torch.cat((freqs, freqs), dim=-1)[:, :, None, :]  # [batch, pos, 1, rotary_dim]
            cos, sin = emb.cos().to(x.dtype), emb.sin().to(x.dtype)
        else:
            pos_embed = self.W_pos[pos]
            if torch.is_grad_enabled():
                pos_embed.requires_grad_(True)
            x = x + self.hook_pos_embed(pos_embed)
        if torch.is_grad_enabled() and not x.requires_grad:
            x = x.detach().requires_grad_(True)  # a hook replaced the embeddings with constants
        idx = torch.arange(n, device=tokens.device)
        allowed = idx[None, :] <= idx[:, None]  # [query, key] causal
        if cfg.sliding_window is not None:
            allowed = allowed & (idx[:, None] - idx[None, :] < cfg.sliding_window)
        # Pad queries may see themselves, so no softmax row is all -inf; they are never read.
        mask = (allowed & real[:, None, None, :]) | torch.eye(n, dtype=torch.bool,
                                                               device=tokens.device)
        for block in self.blocks:
            x = block(x, mask, cos, sin)
        return self.ln_final(x) @ self.W_U + self.b_U  # [batch, pos, d_vocab]

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
                       fwd_hooks: Iterable[tuple[str, HookFn]] = ()) -> Cache:
        """Forward values of `names` and, with `backward_of(logits) -> scalar`, the gradients of
        that scalar at `grad_names` (default: `names`). Nothing else is kept."""
        grad_names = list(names if grad_names is None else grad_names) if backward_of else []
        for name in [*names, *grad_names]:
            self.hook_point(name)
        wanted = set(names) | set(grad_names)
        kept: dict[str, torch.Tensor] = {}

        def keep(t, name):
            kept[name] = t

        with torch.set_grad_enabled(backward_of is not None), \
                self.hooks([*fwd_hooks, *((n, keep) for n in wanted)]):
            logits = self(tokens, attention_mask)
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
