"""Load a local Hugging Face checkpoint into the hooked model, never touching the network.

A checkpoint is a folder with config.json and safetensors or pytorch_model.bin weights (sharded
or not), or the name of a model already in the local Hugging Face cache. The tokenizer comes
from the same folder. `ModelInfo` carries what the warehouse's `models` table records.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import threading
from collections.abc import Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import torch

from actwh.compute.model import HookedTransformer, ModelConfig, Rope
from actwh.errors import ModelLoadError, UnsupportedArchitecture

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")  # config chatter is not for our users

GEMMA = ("gemma", "gemma2", "gemma3_text")  # RMSNorm 1 + w, embeddings × √d, GeGLU
MOE = ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe")  # softmax top-k routers, every layer sparse
LLAMA_LIKE = ("llama", "mistral", "qwen2", "qwen3", "phi3", *GEMMA, "olmo2", *MOE)
SUPPORTED = ("gpt2", "gpt_neox", *LLAMA_LIKE)
ROPE_TYPES = ("default", "linear", "dynamic", "yarn", "longrope", "llama3")
LAYER_TYPES = ("full_attention", "sliding_attention")
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


def check_device(device: str | None) -> None:
    """A device torch knows and this machine has (None: cuda if present, else cpu)."""
    if device is None:
        return
    try:
        d = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise ModelLoadError(f"unknown device {device!r}; valid: cpu, cuda, cuda:N, mps") from None
    if d.type == "cuda":
        if not torch.cuda.is_available():
            raise ModelLoadError(f"device {device!r}: no CUDA device is available here; use cpu")
        if d.index is not None and d.index >= torch.cuda.device_count():
            raise ModelLoadError(f"device {device!r}: only {torch.cuda.device_count()} CUDA devices")
    elif d.type == "mps":
        if not torch.backends.mps.is_available():
            raise ModelLoadError(f"device {device!r}: MPS is not available here; use cpu")
    elif d.type != "cpu":
        raise ModelLoadError(f"device {device!r} is not supported; valid: cpu, cuda, cuda:N, mps")


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


SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2, "I64": torch.int64,
    "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool}
BASE_PREFIXES = ("transformer.", "gpt_neox.", "model.")


def _damaged(f: Path, why: str) -> ModelLoadError:
    return ModelLoadError(f"cannot read weights {f}: damaged or not a weights file ({why[:120]})")


class Weights(Mapping):
    """A checkpoint's tensors by name (base-model prefix stripped, so `transformer.h.0...` and
    `h.0...` layouts both load), read from disk only when asked for, one tensor at a time.

    safetensors files are read by their header's offsets straight into a fresh tensor (no memory
    map kept, so what a loader holds is the tensors it still uses); each tensor goes to `device`
    (float64 rounded to float32 first) and is refused there if it holds NaN or infinite values.
    pytorch_model.bin files are memory mapped by torch.load. `unread()` names the tensors never
    asked for, so a loader can still check them."""

    def __init__(self, files: list[Path], device: str | torch.device = "cpu", folder: Path | None = None):
        self.device = torch.device(device)
        self.folder = folder or (files[0].parent if files else Path("."))
        self.where: dict[str, tuple] = {}  # name -> (file, dtype, shape, start, end) or (file, tensor)
        self.read: set[str] = set()
        self._handles: dict[Path, object] = {}
        for f in files:
            entries = self._safetensors_header(f) if f.suffix == ".safetensors" else self._bin(f)
            for name, entry in entries.items():
                for prefix in BASE_PREFIXES:
                    if name.startswith(prefix):
                        name = name[len(prefix):]
                        break
                self.where[name] = entry

    @staticmethod
    def _safetensors_header(f: Path) -> dict[str, tuple]:
        size = f.stat().st_size
        with f.open("rb") as fh:
            head = fh.read(8)
            n = int.from_bytes(head, "little") if len(head) == 8 else -1
            if n < 2 or 8 + n > size:
                raise _damaged(f, "header length past the end of the file")
            try:
                header = json.loads(fh.read(n))
            except (UnicodeDecodeError, json.JSONDecodeError) as e:
                raise _damaged(f, f"header: {e}") from None
        if not isinstance(header, dict):
            raise _damaged(f, "header is not an object")
        out = {}
        for name, e in header.items():
            if name == "__metadata__":
                continue
            if isinstance(e, dict) and isinstance(e.get("dtype"), str) and e["dtype"] not in SAFETENSORS_DTYPES:
                raise ModelLoadError(f"weights {f}: tensor {name} has dtype {e['dtype']}, which actwh "
                                     f"does not read (it reads {', '.join(SAFETENSORS_DTYPES)})")
            try:
                dtype = SAFETENSORS_DTYPES[e["dtype"]]
                shape = tuple(int(d) for d in e["shape"])
                start, end = (8 + n + int(o) for o in e["data_offsets"])
            except (KeyError, TypeError, ValueError):
                raise _damaged(f, f"tensor {name}: {str(e)[:60]}") from None
            if end > size or end - start != math.prod(shape) * dtype.itemsize:
                raise _damaged(f, f"tensor {name} lies outside the file or has the wrong size")
            out[name] = (f, dtype, shape, start, end)
        return out

    @staticmethod
    def _bin(f: Path) -> dict[str, tuple]:
        try:
            try:
                state = torch.load(f, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError as e:  # the legacy (pre-zip) format cannot be memory mapped
                if "mmap" not in str(e):
                    raise
                state = torch.load(f, map_location="cpu", weights_only=True)
        except Exception as e:  # pickle and zip errors have no common base
            raise _damaged(f, str(e).splitlines()[0] if str(e) else type(e).__name__) from None
        if not isinstance(state, dict):
            raise _damaged(f, f"holds a {type(state).__name__}, not a state dict")
        return {k: (f, v) for k, v in state.items()}

    def __getitem__(self, name: str) -> torch.Tensor:
        entry = self.where[name]
        if len(entry) == 2:
            t = entry[1]
        else:
            f, dtype, shape, start, end = entry
            buf = torch.empty(end - start, dtype=torch.uint8)
            fh = self._handles.get(f) or self._handles.setdefault(f, f.open("rb", buffering=0))
            view, done = memoryview(buf.numpy()), 0
            fh.seek(start)
            while done < len(view):
                got = fh.readinto(view[done:])
                if not got:
                    raise _damaged(f, f"tensor {name} ends past the end of the file")
                done += got
            t = buf.view(dtype).view(shape)
        # float64 is rounded to float32 here, as the old float32 model did (MPS has no float64)
        t = (t.float() if t.dtype == torch.float64 else t).to(self.device)
        self.read.add(name)
        if t.is_floating_point() and t.numel() and not _finite(t):
            raise ModelLoadError(f"weights in {self.folder}: {name} holds NaN or infinite values")
        return t

    def __iter__(self):
        return iter(self.where)

    def __len__(self) -> int:
        return len(self.where)

    def __contains__(self, name) -> bool:
        return name in self.where

    def unread(self) -> list[str]:
        return [n for n in self.where if n not in self.read]

    def close(self) -> None:
        for fh in self._handles.values():
            fh.close()
        self._handles.clear()


def _finite(t: torch.Tensor) -> bool:
    """No NaN or infinity in t: its min and max, one pass and no temporary (float8 through float32)."""
    wide = t if t.dtype in (torch.float16, torch.bfloat16, torch.float32) else t.float()
    return bool(torch.isfinite(torch.stack(torch.aminmax(wide))).all())


def sha256_files(files: list[Path], stop: threading.Event | None = None) -> str:
    """sha256 over the files' bytes in the given order (hashlib releases the GIL, so this runs
    beside the loading in a thread)."""
    digest = hashlib.sha256()
    for f in files:
        with f.open("rb") as fh:
            for chunk in iter(lambda: fh.read(8 << 20), b""):
                if stop is not None and stop.is_set():
                    return ""
                digest.update(chunk)
    return digest.hexdigest()


def config_from_hf(c: dict) -> ModelConfig:
    arch = c.get("model_type")
    if "vision_config" in c or "text_config" in c:
        field = "vision_config" if "vision_config" in c else "text_config"
        raise UnsupportedArchitecture(f"model_type {arch!r} is multimodal ({field}); actwh loads "
                                      "text-only checkpoints (e.g. gemma3_text)")
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
    if arch == "gpt_neox":
        scaling = c.get("rope_scaling") or {}  # configs written before transformers 5
        rope = c.get("rope_parameters") or {
            "rope_type": scaling.get("rope_type", scaling.get("type", "default")),
            "rope_theta": c.get("rope_theta", 10000.0)}
        d, h = c["hidden_size"], c["num_attention_heads"]
        d_head = c.get("head_dim") or d // h
        pct = rope.get("partial_rotary_factor", c.get("rotary_pct", 1.0))
        return ModelConfig(arch, c["num_hidden_layers"], d, h, h, d_head, c["intermediate_size"],
                           c["vocab_size"], c["max_position_embeddings"],
                           norm_eps=c.get("layer_norm_eps", 1e-5), act=c.get("hidden_act", "gelu"),
                           rotary_dim=int(d_head * pct),
                           rope=_rope({**rope, "partial_rotary_factor": pct}, d_head,
                                      c["max_position_embeddings"]),
                           parallel=c.get("use_parallel_residual", True))
    return _llama_like(arch, _hf_config(c))


def _hf_config(c: dict):
    """transformers' own reading of config.json: its defaults, derived layer_types and the
    rope_parameters it standardises (old rope_scaling / rope_theta keys, Phi-3's su → longrope)."""
    from transformers import AutoConfig

    try:
        return AutoConfig.for_model(**c)
    except Exception as e:  # transformers validates the config; its message names the field
        raise ModelLoadError(f"config.json is not a valid {c.get('model_type')} config: "
                             f"{str(e).strip().splitlines()[0]}") from None


def _rope(params: dict, d_head: int, max_pos: int) -> Rope:
    """One layer type's rope_parameters, with the defaults transformers' init functions fill in."""
    kind = params.get("rope_type", params.get("type", "default"))
    if kind not in ROPE_TYPES:
        raise UnsupportedArchitecture(f"rope_parameters.rope_type {kind!r} is not supported; "
                                      f"supported: {', '.join(ROPE_TYPES)}")
    dim = int(d_head * params.get("partial_rotary_factor", 1.0))
    original = params.get("original_max_position_embeddings") or max_pos
    factor = params.get("factor")
    if factor is None:
        factor = max_pos / original if kind in ("yarn", "longrope") else 1.0
    attention = params.get("attention_factor")
    if attention is None and kind == "yarn":
        def mscale(scale, m=1.0):
            return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0
        m, m_all = params.get("mscale"), params.get("mscale_all_dim")
        attention = mscale(factor, m) / mscale(factor, m_all) if m and m_all else mscale(factor)
    elif attention is None and kind == "longrope":
        attention = 1.0 if factor <= 1 else math.sqrt(1 + math.log(factor) / math.log(original))
    return Rope(kind, float(params.get("rope_theta", 10000.0)), dim, float(factor), int(original),
                float(params.get("low_freq_factor", 1.0)), float(params.get("high_freq_factor", 4.0)),
                float(params.get("beta_fast") or 32), float(params.get("beta_slow") or 1),
                bool(params.get("truncate", True)), float(attention or 1.0),
                tuple(params.get("short_factor") or ()), tuple(params.get("long_factor") or ()))


def _llama_like(arch: str, hf) -> ModelConfig:
    """Llama, Mistral, Qwen2/2.5, Qwen3, Phi-3, Gemma 1/2/3 (text) and OLMo 2: one decoder with
    rotary, RMSNorm and gated MLPs; the switches below are what tells them apart."""
    d, h = hf.hidden_size, hf.num_attention_heads
    d_head = getattr(hf, "head_dim", None) or d // h
    max_pos = hf.max_position_embeddings
    types = tuple(getattr(hf, "layer_types", None) or ())
    bad = [t for t in types if t not in LAYER_TYPES]
    if bad:
        raise UnsupportedArchitecture(f"layer_types entry {bad[0]!r} is not supported; "
                                      f"supported: {', '.join(LAYER_TYPES)}")
    if getattr(hf, "use_bidirectional_attention", False):
        raise UnsupportedArchitecture("use_bidirectional_attention is not supported (causal models only)")
    rope_params = hf.rope_parameters or {}
    local = None
    if set(rope_params) & set(LAYER_TYPES):  # per layer type (Gemma 3's local/global bases)
        local = _rope(rope_params["sliding_attention"], d_head, max_pos) \
            if "sliding_attention" in rope_params else None
        rope_params = rope_params.get("full_attention") or rope_params["sliding_attention"]
    rope = _rope(rope_params, d_head, max_pos)
    gemma = arch in GEMMA
    window = getattr(hf, "sliding_window", None)
    qk = {"qwen3": "head", "qwen3_moe": "head", "gemma3_text": "head", "olmo2": "all",
          "olmoe": "all"}.get(arch)
    moe = _moe(arch, hf) if arch in MOE else {}
    return ModelConfig(
        arch=arch, n_layers=hf.num_hidden_layers, d_model=d, n_heads=h,
        n_kv_heads=getattr(hf, "num_key_value_heads", None) or h, d_head=d_head,
        d_mlp=moe.pop("d_mlp", None) or hf.intermediate_size, d_vocab=hf.vocab_size, n_ctx=max_pos,
        norm="rmsnorm",
        norm_eps=hf.rms_norm_eps, act=getattr(hf, "hidden_activation", None) or hf.hidden_act,
        rotary_dim=rope.dim, rope=rope, rope_local=local, gated_mlp=True,
        sliding_window=window if window and (not types or "sliding_attention" in types) else None,
        layer_types=types if window else (),
        pre_norm=arch != "olmo2", post_norm=arch in ("gemma2", "gemma3_text", "olmo2"),
        qk_norm=qk, embed_scale=math.sqrt(d) if gemma else 1.0,
        attn_scalar=getattr(hf, "query_pre_attn_scalar", None) if gemma else None,
        attn_softcap=getattr(hf, "attn_logit_softcapping", None),
        final_softcap=getattr(hf, "final_logit_softcapping", None), **moe)


def _moe(arch: str, hf) -> dict:
    """Mixtral, Qwen2-MoE, Qwen3-MoE and OLMoE routers: softmax over the experts, top-k."""
    for field in ("scoring_func", "topk_method", "router_type"):  # other routers' config fields
        value = getattr(hf, field, None)
        if value is not None and value not in ("softmax", "greedy"):
            raise UnsupportedArchitecture(f"{field} {value!r} is not supported (softmax top-k "
                                          "routers only)")
    if getattr(hf, "mlp_only_layers", None) or getattr(hf, "decoder_sparse_step", 1) != 1:
        raise UnsupportedArchitecture("mlp_only_layers / decoder_sparse_step: dense MLP layers "
                                      "between expert layers are not supported")
    if getattr(hf, "clip_qkv", None):
        raise UnsupportedArchitecture("clip_qkv is not supported")
    n_experts = hf.num_local_experts if arch == "mixtral" else hf.num_experts
    return dict(n_experts=n_experts, top_k=hf.num_experts_per_tok,
                norm_topk_prob=arch == "mixtral" or bool(getattr(hf, "norm_topk_prob", False)),
                d_mlp=getattr(hf, "moe_intermediate_size", None) or hf.intermediate_size,
                d_shared=getattr(hf, "shared_expert_intermediate_size", 0) if arch == "qwen2_moe" else 0)


def _strip(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drop the base-model prefix so both `transformer.h.0...` and `h.0...` layouts load."""
    out = {}
    for k, v in state.items():
        for prefix in BASE_PREFIXES:
            if k.startswith(prefix):
                k = k[len(prefix):]
                break
        out[k] = v
    return out


TIED = "tied"  # a W_U value in convert_groups: the loaded embedding W_E, transposed


def convert(cfg: ModelConfig, c: dict, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Hugging Face parameter names and layouts to ours ([head, d_model, d_head] and so on)."""
    out: dict = {}
    for group in convert_groups(cfg, c, _strip(state)):
        out.update(group)
    if isinstance(out["W_U"], str):
        out["W_U"] = out["W_E"].T
    return {k: v.contiguous() for k, v in out.items()}


def convert_groups(cfg: ModelConfig, c: dict, s: Mapping[str, torch.Tensor]) -> Iterator[dict]:
    """`convert` one group at a time: the embeddings, each layer, then the final norm with the
    unembedding (TIED where it is the embedding), reading from `s` (prefixes stripped) only what
    each group needs, so a streaming loader holds one layer's tensors at a time. Values may be
    views (transposed, split); the loader copies them into its parameters."""
    h, d, e = cfg.n_heads, cfg.d_model, cfg.d_head
    if cfg.arch == "gpt2":
        yield {"W_E": s["wte.weight"], "W_pos": s["wpe.weight"]}
        for i in range(cfg.n_layers):
            p, o, out = f"h.{i}.", f"blocks.{i}.", {}
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
            yield out
        final = {"ln_final.w": s["ln_f.weight"], "ln_final.b": s["ln_f.bias"]}
        unembed = "lm_head.weight"
    elif cfg.arch == "gpt_neox":
        yield {"W_E": s["embed_in.weight"]}
        for i in range(cfg.n_layers):
            p, o, out = f"layers.{i}.", f"blocks.{i}.", {}
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
            yield out
        final = {"ln_final.w": s["final_layer_norm.weight"], "ln_final.b": s["final_layer_norm.bias"]}
        unembed = "embed_out.weight" if "embed_out.weight" in s else "lm_head.weight"
    else:  # Llama family (Qwen, Phi-3, Gemma, OLMo 2)
        final = yield from _llama_like_groups(cfg, s)
        unembed = "lm_head.weight"
    if unembed not in s or c.get("tie_word_embeddings", cfg.arch == "gpt2" or cfg.arch in GEMMA):
        final["W_U"] = TIED
    else:
        final["W_U"] = s[unembed].T
    yield final


def _llama_like_groups(cfg: ModelConfig, s: Mapping[str, torch.Tensor]):
    """Yields the embedding and each layer; returns the final norm's group."""
    h, kv, d, e = cfg.n_heads, cfg.n_kv_heads, cfg.d_model, cfg.d_head
    gemma = cfg.arch in GEMMA
    norm_w = (lambda w: 1.0 + w.float()) if gemma else (lambda w: w)  # Gemma: RMSNorm by 1 + w

    def heads_in(w, n):  # a Linear weight [n * e, d] -> [n, d, e]
        return w.reshape(n, e, d).transpose(1, 2)

    yield {"W_E": s["embed_tokens.weight"]}
    norms = {"ln1": "input_layernorm", "ln2": "post_attention_layernorm"}
    if cfg.post_norm:
        norms = {"ln1_post": "post_attention_layernorm", "ln2_post": "post_feedforward_layernorm"}
        if cfg.pre_norm:
            norms.update(ln1="input_layernorm", ln2="pre_feedforward_layernorm")
    for i in range(cfg.n_layers):
        p, o, out = f"layers.{i}.", f"blocks.{i}.", {}
        if p + "self_attn.qkv_proj.weight" in s:  # Phi-3: rows [q | k | v], split here
            proj = dict(zip("qkv", s[p + "self_attn.qkv_proj.weight"].split([h * e, kv * e, kv * e])))
        else:
            proj = {n: s[p + f"self_attn.{n}_proj.weight"] for n in "qkv"}
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
        elif p + "mlp.gate_up_proj.weight" in s:  # Phi-3: rows [gate | up], split here
            mlp = dict(zip(("gate_proj", "up_proj"), s[p + "mlp.gate_up_proj.weight"].chunk(2, 0)))
            mlp["down_proj"] = s[p + "mlp.down_proj.weight"]
        else:
            mlp = {hf: s[p + f"mlp.{hf}.weight"] for hf in ("gate_proj", "up_proj", "down_proj")}
        for ours, hf in (("W_in", "gate_proj"), ("W_up", "up_proj"), ("W_out", "down_proj")):
            out[o + f"mlp.{ours}"] = mlp[hf].T
            if p + f"mlp.{hf}.bias" in s:
                out[o + f"mlp.{ours.replace('W_', 'b_')}"] = s[p + f"mlp.{hf}.bias"]
        for ours, hf in norms.items():
            out[o + f"{ours}.w"] = norm_w(s[p + f"{hf}.weight"])
        yield out
    return {"ln_final.w": norm_w(s["norm.weight"])}


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


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model")
_LAYER_KEY = re.compile(r"(?:^|\.)(?:h|layers)\.(\d+)\.")


def _check_layers(folder: Path, cfg: ModelConfig, names) -> None:
    """Weights for more or fewer layers than the config declares are refused."""
    layers = {int(m.group(1)) for k in names for m in [_LAYER_KEY.search(k)] if m}
    if layers and max(layers) + 1 != cfg.n_layers:
        raise ModelLoadError(f"config.json in {folder} declares {cfg.n_layers} layers but the "
                             f"weights hold {max(layers) + 1}")


@torch.no_grad()
def build_model(cfg: ModelConfig, c: dict, weights: Weights, device: torch.device,
                dtype: torch.dtype, folder: Path) -> HookedTransformer:
    """The model built on the meta device, given uninitialised storage in `dtype` on `device`,
    then filled group by group from `weights` (one layer's tensors in memory at a time).

    Values are those of building the model in float32, loading the checkpoint into it and
    casting to `dtype` (what actwh did before): every checkpoint dtype of at most 32 bits
    converts to float32 exactly, so one cast from it is the same rounding; float64 values are
    rounded to float32 first (`Weights`)."""
    with torch.device("meta"):
        model = HookedTransformer(cfg)
    model.to(dtype=dtype).to_empty(device=device)
    model.init_buffers()
    params = dict(model.named_parameters())
    loaded = set()
    try:
        for group in convert_groups(cfg, c, weights):
            for name, t in group.items():
                if name not in params:
                    continue  # like load_state_dict(strict=False): a value we have no place for
                p = params[name]
                if isinstance(t, str):  # TIED: the embedding as loaded, transposed
                    t = params["W_E"].T
                if t.shape != p.shape:
                    raise ModelLoadError(f"weights in {folder} do not match its config.json: {name} "
                                         f"has shape {list(t.shape)}, the config gives {list(p.shape)}")
                p.copy_(t)
                loaded.add(name)
    except KeyError as e:
        raise ModelLoadError(f"weights in {folder} do not match its config.json: no tensor "
                             f"{e.args[0]!r}") from None
    except torch.OutOfMemoryError:
        raise
    except RuntimeError as e:  # a tensor that cannot take the config's shape (reshape, split)
        raise ModelLoadError(f"weights in {folder} do not match its config.json: "
                             f"{str(e).splitlines()[0][:200]}") from None
    # Only biases a family lacks may be absent; they are zero.
    missing = [n for n in params if n not in loaded]
    lacking = [m for m in missing if not m.split(".")[-1].startswith("b")]
    if lacking:
        raise ModelLoadError(f"weights in {folder} lack {', '.join(lacking[:5])}")
    for name in missing:
        params[name].zero_()
    model.mark_absent_biases(missing)
    for name in weights.unread():  # never converted, still checked for NaN (weights[name] does)
        weights[name]
    return model.eval()


def load_model(name_or_path: str | os.PathLike | None = None, device: str | None = None,
               dtype: torch.dtype = torch.float32) -> LoadedModel:
    """Load a checkpoint folder (or cache name, or the default model when None) and its tokenizer.

    The model is built on the meta device and its weights streamed from the files to `device`
    one layer at a time, already in `dtype`: host memory holds the model's weights (when
    `device` is the CPU) plus one layer's tensors. The files' sha256 is taken in a thread
    alongside."""
    folder = resolve(name_or_path)
    try:
        c = json.loads((folder / "config.json").read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ModelLoadError(f"cannot read {folder / 'config.json'}: {e}") from None
    if not isinstance(c, dict):
        raise ModelLoadError(f"{folder / 'config.json'} holds a {type(c).__name__}, not an object")
    try:
        cfg = config_from_hf(c)
    except KeyError as e:
        raise ModelLoadError(f"{folder / 'config.json'} lacks {e.args[0]!r}") from None
    except (TypeError, ValueError, AttributeError, ZeroDivisionError) as e:
        raise ModelLoadError(f"{folder / 'config.json'} has a malformed value: {e}") from None
    check_device(device)
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    files = weight_files(folder)
    if not any((folder / f).exists() for f in TOKENIZER_FILES):
        raise ModelLoadError(f"model folder {folder} has no tokenizer (none of "
                             f"{', '.join(TOKENIZER_FILES)})")
    stop = threading.Event()
    with ThreadPoolExecutor(1) as pool:
        sha = pool.submit(sha256_files, files, stop)
        weights = None
        try:
            weights = Weights(files, device, folder)
            _check_layers(folder, cfg, weights)
            model = build_model(cfg, c, weights, device, dtype, folder)
        except BaseException:
            stop.set()
            raise
        finally:
            if weights is not None:
                weights.close()
        sha = sha.result()
    try:
        tokenizer = load_tokenizer(folder)
    except Exception as e:
        raise ModelLoadError(f"cannot load the tokenizer from {folder}: {e}") from None
    info = ModelInfo(str(name_or_path) if name_or_path else "default", str(folder), sha, cfg.arch, c)
    return LoadedModel(model, tokenizer, info)
