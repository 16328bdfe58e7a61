"""Load a local Hugging Face checkpoint into the hooked model, never touching the network.

A checkpoint is a folder with config.json and safetensors or pytorch_model.bin weights (sharded
or not), or the name of a model already in the local Hugging Face cache. The tokenizer comes
from the same folder. `ModelInfo` carries what the warehouse's `models` table records.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from actwh.compute.model import HookedTransformer, ModelConfig
from actwh.errors import ModelLoadError, UnsupportedArchitecture

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")  # config chatter is not for our users

SUPPORTED = ("gpt2", "gpt_neox", "llama", "mistral", "qwen2")
DEFAULT_MODEL_DIR = Path(__file__).parent / "default_model" / "weights"


@dataclass(frozen=True)
class ModelInfo:
    name: str  # what the user asked for (a path or a cache name)
    source: str  # the resolved folder
    weights_sha256: str  # over the weight files' bytes, in sorted file order
    arch: str
    config: dict = field(repr=False)  # the checkpoint's config.json


@dataclass
class LoadedModel:
    model: HookedTransformer
    tokenizer: object
    info: ModelInfo


def resolve(name_or_path: str | os.PathLike | None) -> Path:
    """A checkpoint folder: the path itself, a local HF cache entry, or the default model."""
    if name_or_path is None:
        return DEFAULT_MODEL_DIR
    path = Path(name_or_path).expanduser()
    if path.exists():
        if not path.is_dir():
            raise ModelLoadError(f"model path {path} is not a folder")
        if not (path / "config.json").exists():
            raise ModelLoadError(f"model folder {path} has no config.json")
        return path
    if "/" in str(name_or_path) and not str(name_or_path).startswith((".", "/", "~")):
        from huggingface_hub import snapshot_download

        try:
            return Path(snapshot_download(str(name_or_path), local_files_only=True))
        except Exception:
            pass
    raise ModelLoadError(f"model {name_or_path!s} not found (no such folder, not in the local "
                         "Hugging Face cache; actwh never downloads)")


def weight_files(folder: Path) -> list[Path]:
    for index in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        if (folder / index).exists():
            shards = json.loads((folder / index).read_text())["weight_map"].values()
            return sorted({folder / s for s in shards})
    for single in ("model.safetensors", "pytorch_model.bin"):
        if (folder / single).exists():
            return [folder / single]
    raise ModelLoadError(f"model folder {folder} has no model.safetensors or pytorch_model.bin")


def read_state_dict(files: list[Path]) -> tuple[dict[str, torch.Tensor], str]:
    from safetensors.torch import load_file

    state, digest = {}, hashlib.sha256()
    for f in files:
        with f.open("rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                digest.update(chunk)
        if f.suffix == ".safetensors":
            state.update(load_file(f))
        else:
            state.update(torch.load(f, map_location="cpu", weights_only=True))
    return state, digest.hexdigest()


def config_from_hf(c: dict) -> ModelConfig:
    arch = c.get("model_type")
    if arch not in SUPPORTED:
        raise UnsupportedArchitecture(
            f"unsupported model_type {arch!r}; supported: {', '.join(SUPPORTED)}")
    if arch == "gpt2":
        if c.get("scale_attn_by_inverse_layer_idx") or c.get("reorder_and_upcast_attn"):
            raise UnsupportedArchitecture("gpt2 with scale_attn_by_inverse_layer_idx or "
                                          "reorder_and_upcast_attn is not supported")
        d = c["n_embd"]
        return ModelConfig(arch, c["n_layer"], d, c["n_head"], c["n_head"], d // c["n_head"],
                           c.get("n_inner") or 4 * d, c["vocab_size"], c["n_positions"],
                           norm_eps=c.get("layer_norm_epsilon", 1e-5),
                           act=c.get("activation_function", "gelu_new"))
    scaling = c.get("rope_scaling") or {}  # configs written before transformers 5
    rope = c.get("rope_parameters") or {
        "rope_type": scaling.get("rope_type", scaling.get("type", "default")),
        "rope_theta": c.get("rope_theta", 10000.0)}
    if rope.get("rope_type", "default") != "default":
        raise UnsupportedArchitecture(f"rope_type {rope.get('rope_type')!r} is not supported")
    d, h = c["hidden_size"], c["num_attention_heads"]
    d_head = c.get("head_dim") or d // h
    common = dict(arch=arch, n_layers=c["num_hidden_layers"], d_model=d, n_heads=h,
                  d_head=d_head, d_mlp=c["intermediate_size"], d_vocab=c["vocab_size"],
                  n_ctx=c["max_position_embeddings"], rotary_base=rope.get("rope_theta", 10000.0),
                  act=c.get("hidden_act", "gelu"))
    if arch == "gpt_neox":
        pct = rope.get("partial_rotary_factor", c.get("rotary_pct", 1.0))
        return ModelConfig(**common, n_kv_heads=h, norm_eps=c.get("layer_norm_eps", 1e-5),
                           rotary_dim=int(d_head * pct),
                           parallel=c.get("use_parallel_residual", True))
    if arch == "qwen2" and c.get("use_sliding_window"):
        raise UnsupportedArchitecture("qwen2 with use_sliding_window is not supported")
    return ModelConfig(**common, n_kv_heads=c.get("num_key_value_heads") or h, norm="rmsnorm",
                       norm_eps=c.get("rms_norm_eps", 1e-6), rotary_dim=d_head, gated_mlp=True,
                       sliding_window=c.get("sliding_window") if arch == "mistral" else None)


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
    else:  # Llama family
        out["W_E"] = s["embed_tokens.weight"]
        for i in range(cfg.n_layers):
            p, o = f"layers.{i}.", f"blocks.{i}."
            for name, n in (("q", h), ("k", kv), ("v", kv)):
                out[o + f"attn.W_{name.upper()}"] = heads_in(s[p + f"self_attn.{name}_proj.weight"], n)
                if p + f"self_attn.{name}_proj.bias" in s:
                    out[o + f"attn.b_{name.upper()}"] = s[p + f"self_attn.{name}_proj.bias"].reshape(n, e)
            out[o + "attn.W_O"] = s[p + "self_attn.o_proj.weight"].T.reshape(h, e, d)
            if p + "self_attn.o_proj.bias" in s:
                out[o + "attn.b_O"] = s[p + "self_attn.o_proj.bias"]
            for ours, hf in (("W_in", "gate_proj"), ("W_up", "up_proj"), ("W_out", "down_proj")):
                out[o + f"mlp.{ours}"] = s[p + f"mlp.{hf}.weight"].T
                if p + f"mlp.{hf}.bias" in s:
                    out[o + f"mlp.{ours.replace('W_', 'b_')}"] = s[p + f"mlp.{hf}.bias"]
            out[o + "ln1.w"] = s[p + "input_layernorm.weight"]
            out[o + "ln2.w"] = s[p + "post_attention_layernorm.weight"]
        out["ln_final.w"] = s["norm.weight"]
        unembed = get("lm_head.weight")
    if unembed is None or c.get("tie_word_embeddings", cfg.arch == "gpt2"):
        unembed = out["W_E"]
    out["W_U"] = unembed.T
    return {k: v.contiguous() for k, v in out.items()}


def load_tokenizer(folder: Path):
    """The folder's tokenizer as saved. transformers 5's AutoTokenizer picks a class by model_type
    and rebuilds the pipeline for some (Qwen2), ignoring a generic tokenizer.json; when the
    folder names the generic class, load exactly that file."""
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    cfg_path = folder / "tokenizer_config.json"
    cls = json.loads(cfg_path.read_text()).get("tokenizer_class") if cfg_path.exists() else None
    if cls in ("TokenizersBackend", "PreTrainedTokenizerFast") and (folder / "tokenizer.json").exists():
        return PreTrainedTokenizerFast.from_pretrained(folder)
    return AutoTokenizer.from_pretrained(folder)


def load_model(name_or_path: str | os.PathLike | None = None, device: str | None = None,
               dtype: torch.dtype = torch.float32) -> LoadedModel:
    """Load a checkpoint folder (or cache name, or the default model when None) and its tokenizer."""
    folder = resolve(name_or_path)
    try:
        c = json.loads((folder / "config.json").read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ModelLoadError(f"cannot read {folder / 'config.json'}: {e}") from None
    cfg = config_from_hf(c)
    state, sha = read_state_dict(weight_files(folder))
    model = HookedTransformer(cfg)
    try:
        missing, unexpected = model.load_state_dict(convert(cfg, c, state), strict=False)
    except (KeyError, RuntimeError) as e:
        raise ModelLoadError(f"weights in {folder} do not match its config.json: {e}") from None
    # Only biases a family lacks may stay at their zero initialisation.
    missing = [m for m in missing if not m.split(".")[-1].startswith("b")]
    if missing:
        raise ModelLoadError(f"weights in {folder} lack {', '.join(missing[:5])}")
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    model.to(device=device, dtype=dtype).eval()
    try:
        tokenizer = load_tokenizer(folder)
    except Exception as e:
        raise ModelLoadError(f"cannot load the tokenizer from {folder}: {e}") from None
    info = ModelInfo(str(name_or_path) if name_or_path else "default", str(folder), sha, cfg.arch, c)
    return LoadedModel(model, tokenizer, info)
