"""actwh's weight conversion as it was at b84f5c4 (before streaming), copied verbatim so the loading
test's reference is independent of the conversion code under test (compute/loading.py)."""

from __future__ import annotations

import torch

from actwh.compute.model import ModelConfig

GEMMA = ("gemma", "gemma2", "gemma3_text")


def _strip(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drop the base-model prefix so both `transformer.h.0...` and `h.0...` layouts load."""
    out = {}
    for k, v in state.items():
        for prefix in ("transformer.", "gpt_neox.", "model."):
            if k.startswith(prefix):
                k = k[len(prefix):]
                break
        out[k] = v
    return out


def convert(cfg: ModelConfig, c: dict, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Hugging Face parameter names and layouts to ours ([head, d_model, d_head] and so on)."""
    s = _strip(state)
    h, kv, d, e = cfg.n_heads, cfg.n_kv_heads, cfg.d_model, cfg.d_head
    out: dict[str, torch.Tensor] = {}
    get = s.get

    def heads_in(w, n):  # a Linear weight [n * e, d] -> [n, d, e]
        return w.reshape(n, e, d).transpose(1, 2)

    if cfg.arch == "gpt2":
        out["W_E"], out["W_pos"] = s["wte.weight"], s["wpe.weight"]
        for i in range(cfg.n_layers):
            p, o = f"h.{i}.", f"blocks.{i}."
            qkv_w = s[p + "attn.c_attn.weight"]  # Conv1D: [d, 3d]
            qkv_b = s[p + "attn.c_attn.bias"]
            for j, name in enumerate("QKV"):
                out[o + f"attn.W_{name}"] = qkv_w[:, j * d:(j + 1) * d].reshape(d, h, e).permute(1, 0, 2)
                out[o + f"attn.b_{name}"] = qkv_b[j * d:(j + 1) * d].reshape(h, e)
            out[o + "attn.W_O"] = s[p + "attn.c_proj.weight"].reshape(h, e, d)
            out[o + "attn.b_O"] = s[p + "attn.c_proj.bias"]
            out[o + "mlp.W_in"], out[o + "mlp.b_in"] = s[p + "mlp.c_fc.weight"], s[p + "mlp.c_fc.bias"]
            out[o + "mlp.W_out"] = s[p + "mlp.c_proj.weight"]
            out[o + "mlp.b_out"] = s[p + "mlp.c_proj.bias"]
            for ln, hf in (("ln1", "ln_1"), ("ln2", "ln_2")):
                out[o + f"{ln}.w"], out[o + f"{ln}.b"] = s[p + f"{hf}.weight"], s[p + f"{hf}.bias"]
        out["ln_final.w"], out["ln_final.b"] = s["ln_f.weight"], s["ln_f.bias"]
        unembed = get("lm_head.weight")
    elif cfg.arch == "gpt_neox":
        out["W_E"] = s["embed_in.weight"]
        for i in range(cfg.n_layers):
            p, o = f"layers.{i}.", f"blocks.{i}."
            # Fused rows are laid out per head as [q | k | v], each d_head wide.
            w = s[p + "attention.query_key_value.weight"].reshape(h, 3, e, d)
            b = s[p + "attention.query_key_value.bias"].reshape(h, 3, e)
            for j, name in enumerate("QKV"):
                out[o + f"attn.W_{name}"] = w[:, j].transpose(1, 2)
                out[o + f"attn.b_{name}"] = b[:, j]
            out[o + "attn.W_O"] = s[p + "attention.dense.weight"].T.reshape(h, e, d)
            out[o + "attn.b_O"] = s[p + "attention.dense.bias"]
            out[o + "mlp.W_in"] = s[p + "mlp.dense_h_to_4h.weight"].T
            out[o + "mlp.b_in"] = s[p + "mlp.dense_h_to_4h.bias"]
            out[o + "mlp.W_out"] = s[p + "mlp.dense_4h_to_h.weight"].T
            out[o + "mlp.b_out"] = s[p + "mlp.dense_4h_to_h.bias"]
            for ln, hf in (("ln1", "input_layernorm"), ("ln2", "post_attention_layernorm")):
                out[o + f"{ln}.w"], out[o + f"{ln}.b"] = s[p + f"{hf}.weight"], s[p + f"{hf}.bias"]
        out["ln_final.w"], out["ln_final.b"] = s["final_layer_norm.weight"], s["final_layer_norm.bias"]
        unembed = get("embed_out.weight", get("lm_head.weight"))
    else:  # Llama family (Qwen, Phi-3, Gemma, OLMo 2)
        out.update(_convert_llama_like(cfg, s))
        unembed = get("lm_head.weight")
    if unembed is None or c.get("tie_word_embeddings", cfg.arch == "gpt2" or cfg.arch in GEMMA):
        unembed = out["W_E"]
    out["W_U"] = unembed.T
    return {k: v.contiguous() for k, v in out.items()}


def _convert_llama_like(cfg: ModelConfig, s: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    h, kv, d, e = cfg.n_heads, cfg.n_kv_heads, cfg.d_model, cfg.d_head
    out: dict[str, torch.Tensor] = {}
    gemma = cfg.arch in GEMMA
    norm_w = (lambda w: 1.0 + w.float()) if gemma else (lambda w: w)  # Gemma: RMSNorm by 1 + w

    def heads_in(w, n):  # a Linear weight [n * e, d] -> [n, d, e]
        return w.reshape(n, e, d).transpose(1, 2)

    out["W_E"] = s["embed_tokens.weight"]
    norms = {"ln1": "input_layernorm", "ln2": "post_attention_layernorm"}
    if cfg.post_norm:
        norms = {"ln1_post": "post_attention_layernorm", "ln2_post": "post_feedforward_layernorm"}
        if cfg.pre_norm:
            norms.update(ln1="input_layernorm", ln2="pre_feedforward_layernorm")
    for i in range(cfg.n_layers):
        p, o = f"layers.{i}.", f"blocks.{i}."
        proj = {n: s.get(p + f"self_attn.{n}_proj.weight") for n in "qkv"}
        if p + "self_attn.qkv_proj.weight" in s:  # Phi-3: rows [q | k | v], split here
            proj = dict(zip("qkv", s[p + "self_attn.qkv_proj.weight"].split([h * e, kv * e, kv * e])))
        for name, n in (("q", h), ("k", kv), ("v", kv)):
            out[o + f"attn.W_{name.upper()}"] = heads_in(proj[name], n)
            if p + f"self_attn.{name}_proj.bias" in s:
                out[o + f"attn.b_{name.upper()}"] = s[p + f"self_attn.{name}_proj.bias"].reshape(n, e)
        out[o + "attn.W_O"] = s[p + "self_attn.o_proj.weight"].T.reshape(h, e, d)
        if p + "self_attn.o_proj.bias" in s:
            out[o + "attn.b_O"] = s[p + "self_attn.o_proj.bias"]
        if cfg.qk_norm:
            out[o + "attn.q_norm.w"] = norm_w(s[p + "self_attn.q_norm.weight"])
            out[o + "attn.k_norm.w"] = norm_w(s[p + "self_attn.k_norm.weight"])
        if cfg.n_experts:
            mlp = _experts(cfg, s, p, out, o)
        else:
            mlp = {hf: s.get(p + f"mlp.{hf}.weight") for hf in ("gate_proj", "up_proj")}
            if p + "mlp.gate_up_proj.weight" in s:  # Phi-3: rows [gate | up], split here
                mlp = dict(zip(("gate_proj", "up_proj"), s[p + "mlp.gate_up_proj.weight"].chunk(2, 0)))
            mlp["down_proj"] = s[p + "mlp.down_proj.weight"]
        for ours, hf in (("W_in", "gate_proj"), ("W_up", "up_proj"), ("W_out", "down_proj")):
            out[o + f"mlp.{ours}"] = mlp[hf].T
            if p + f"mlp.{hf}.bias" in s:
                out[o + f"mlp.{ours.replace('W_', 'b_')}"] = s[p + f"mlp.{hf}.bias"]
        for ours, hf in norms.items():
            out[o + f"{ours}.w"] = norm_w(s[p + f"{hf}.weight"])
    out["ln_final.w"] = norm_w(s["norm.weight"])
    return out


def _experts(cfg: ModelConfig, s: dict, p: str, out: dict, o: str) -> dict[str, torch.Tensor]:
    """One layer's experts as one wide gated MLP (Linear layouts: gate_proj, up_proj [N, d],
    down_proj [d, N], N = n_experts · d_mlp + d_shared), and its router into `out`. Reads
    per-expert weights (Mixtral's block_sparse_moe w1/w3/w2, Qwen/OLMoE's gate/up/down_proj)
    or transformers' fused in-memory layout (experts.gate_up_proj, experts.down_proj)."""
    E = cfg.n_experts
    moe = next(m for m in ("mlp.", "block_sparse_moe.") if p + m + "gate.weight" in s)
    out[o + "mlp.W_router"] = s[p + moe + "gate.weight"].T
    ex = p + moe + "experts."
    if ex + "gate_up_proj" in s:  # [E, 2 · d_mlp, d] rows [gate | up]; down [E, d, d_mlp]
        gate, up = s[ex + "gate_up_proj"].chunk(2, dim=1)
        down = s[ex + "down_proj"]
    else:
        names = ("w1", "w3", "w2") if ex + "0.w1.weight" in s else ("gate_proj", "up_proj", "down_proj")
        gate, up, down = (torch.stack([s[f"{ex}{e}.{n}.weight"] for e in range(E)]) for n in names)
    mlp = {"gate_proj": gate.flatten(0, 1), "up_proj": up.flatten(0, 1),
           "down_proj": down.transpose(0, 1).flatten(1, 2)}
    if cfg.d_shared:  # Qwen2-MoE: the shared expert is expert E, gated by sigmoid(x · w)
        for n in ("gate_proj", "up_proj"):
            mlp[n] = torch.cat([mlp[n], s[p + f"mlp.shared_expert.{n}.weight"]], 0)
        mlp["down_proj"] = torch.cat([mlp["down_proj"], s[p + "mlp.shared_expert.down_proj.weight"]], 1)
        out[o + "mlp.W_shared_gate"] = s[p + "mlp.shared_expert_gate.weight"].T
    return mlp
