"""Sparse autoencoders spliced into the hooked model, exactly: latents plus an error node.

At a spliced site the value x becomes decode(latents) + error with error = x − decode(encode(x)),
so logits do not change. The error is computed from the unhooked latents, which makes latents
and error separate nodes: a hook that edits latents changes the output by exactly the change in
their decoding, ∂out/∂latents = W_dec, ∂out/∂error = I, and the gradient reaching x is the
model's own (the encoder reads a detached x; edges into latents use the encoder analytically).
New hook sites: `<site>.sae.hook_latents` [batch, pos, d_sae], `<site>.sae.hook_error`
[batch, pos, d_in].

Transcoders (Dunefsky et al. 2024; circuit-tracer) are the second kind: they read the MLP's input
(TransformerLens' `blocks.L.ln2.hook_normalized`, i.e. after the norm's weight and bias) and
replace the MLP's output: mlp_out = decode(latents) + error, error = mlp(x) − decode(latents).
The real MLP still runs inside the error, so the model stays exact and neuron scalars still
read; the latents write to the residual stream as neurons do. Hook sites:
`blocks.L.transcoder.hook_latents` and `blocks.L.transcoder.hook_error`. At most one autoencoder
or transcoder per layer (node_scalars tells them apart by layer).

Layouts read: SAELens (`cfg.json` + `sae_weights.safetensors`: W_enc [d_in, d_sae], b_enc,
W_dec [d_sae, d_in], b_dec, `threshold` for JumpReLU; `hook_name` top-level or under
`metadata`; `apply_b_dec_to_input`) and OpenAI's sparse_autoencoder (a `.pt` state dict with
pre_bias, encoder.weight [d_sae, d_in], latent_bias, decoder.weight [d_in, d_sae]; TopK).
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from actwh.compute.model import HookedTransformer, HookPoint
from actwh.errors import SAEError

ACTIVATIONS = ("relu", "topk", "jumprelu")
SITE_RE = re.compile(r"^blocks\.(\d+)\.(hook_resid_pre|hook_resid_mid|hook_resid_post|hook_attn_out|"
                     r"hook_mlp_out)$")
TRANSCODER_IN_RE = re.compile(r"^blocks\.(\d+)\.(ln2\.hook_normalized|hook_mlp_in)$")
TRANSCODER_ARCHS = {"transcoder": "relu", "jumprelu_transcoder": "jumprelu", "topk_transcoder": "topk"}


@dataclass(frozen=True)
class SAEInfo:
    site: str  # the hook site it reads and replaces
    d_in: int
    d_sae: int
    activation: str  # relu | topk | jumprelu
    k: int | None  # for topk
    apply_b_dec_to_input: bool
    source: str
    weights_sha256: str
    config: dict = field(repr=False)
    kind: str = "sae"  # sae | transcoder

    @property
    def layer(self) -> int:
        return int(self.site.split(".")[1])

    @property
    def prefix(self) -> str:
        """Where its hook sites live: `<prefix>.hook_latents`, `<prefix>.hook_error`."""
        return f"blocks.{self.layer}.transcoder" if self.kind == "transcoder" else f"{self.site}.sae"


class SparseAutoencoder(nn.Module):
    def __init__(self, info: SAEInfo, weights: dict[str, torch.Tensor]):
        super().__init__()
        self.info = info
        self.W_enc = nn.Parameter(weights["W_enc"])  # [d_in, d_sae]
        self.b_enc = nn.Parameter(weights["b_enc"])  # [d_sae]
        self.W_dec = nn.Parameter(weights["W_dec"])  # [d_sae, d_in]
        self.b_dec = nn.Parameter(weights["b_dec"])  # [d_in]
        self.threshold = nn.Parameter(weights.get("threshold", torch.zeros_like(weights["b_enc"])))
        self.hook_latents = HookPoint()  # [batch, pos, d_sae]
        self.hook_error = HookPoint()  # [batch, pos, d_in]
        self.requires_grad_(False)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        if self.info.apply_b_dec_to_input:
            x = x - self.b_dec
        pre = x @ self.W_enc + self.b_enc
        if self.info.activation == "relu":
            return pre.relu()
        if self.info.activation == "jumprelu":
            return pre.relu() * (pre > self.threshold)
        top = pre.topk(self.info.k, dim=-1)
        return torch.zeros_like(pre).scatter(-1, top.indices, top.values.relu())

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return latents @ self.W_dec + self.b_dec

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        latents = self.encode(x.detach())
        if torch.is_grad_enabled():
            latents.requires_grad_(True)  # a node of its own: the gradient stops here
        error = self.hook_error(x - self.decode(latents).detach())
        return self.decode(self.hook_latents(latents)) + error


class Transcoder(SparseAutoencoder):
    """Replaces an MLP: reads the MLP's input, writes its output (latents + error, exactly)."""

    def forward(self, mlp_in: torch.Tensor, mlp_out: torch.Tensor) -> torch.Tensor:
        latents = self.encode(mlp_in.detach())
        if torch.is_grad_enabled():
            latents.requires_grad_(True)
        error = self.hook_error(mlp_out - self.decode(latents).detach())
        return self.decode(self.hook_latents(latents)) + error


def _sha256(files) -> str:
    h = hashlib.sha256()
    for f in files:
        h.update(Path(f).read_bytes())
    return h.hexdigest()


def load_sae(folder: str | Path, site: str | None = None) -> SparseAutoencoder:
    folder = Path(folder)
    if not folder.is_dir():
        raise SAEError(f"SAE folder {folder} not found")
    try:
        if (folder / "cfg.json").exists():
            return _load_saelens(folder, site)
        pts = sorted(folder.glob("*.pt"))
        if pts:
            return _load_openai(folder, pts[0], site)
    except SAEError:
        raise
    except Exception as e:  # damaged files: safetensors, pickle, JSON and shape errors
        text = str(e).splitlines()[0][:160] if str(e) else type(e).__name__
        raise SAEError(f"{folder}: damaged or malformed autoencoder files ({text})") from None
    raise SAEError(f"{folder} holds neither cfg.json + sae_weights.safetensors (SAELens) nor a "
                   ".pt state dict (OpenAI sparse_autoencoder)")


def _load_saelens(folder: Path, site: str | None) -> SparseAutoencoder:
    from safetensors.torch import load_file

    cfg = json.loads((folder / "cfg.json").read_text())
    if not isinstance(cfg, dict):
        raise SAEError(f"{folder / 'cfg.json'} holds a {type(cfg).__name__}, not an object")
    weights_file = folder / "sae_weights.safetensors"
    if not weights_file.exists():
        raise SAEError(f"{folder} has cfg.json but no sae_weights.safetensors")
    w = load_file(weights_file)
    missing = {"W_enc", "b_enc", "W_dec", "b_dec"} - set(w)
    if missing:
        raise SAEError(f"{weights_file} lacks {sorted(missing)}")
    arch = cfg.get("architecture", "standard")
    meta = cfg.get("metadata") or {}
    for key, fine in (("normalize_activations", "none"), ("reshape_activations", "none"),
                      ("rescale_acts_by_decoder_norm", False)):
        if cfg.get(key, fine) not in (fine, None):
            raise SAEError(f"{folder}: {key}={cfg[key]!r} is not supported (only {fine!r})")
    hook_out = cfg.get("hook_name_out") or meta.get("hook_name_out")
    if arch == "skip_transcoder" or "W_skip" in w:
        raise SAEError(f"{folder}: skip transcoders (W_skip) are not supported")
    if arch in TRANSCODER_ARCHS or hook_out:
        activation = {"standard": "relu", "relu": "relu", "topk": "topk", "jumprelu": "jumprelu",
                      **TRANSCODER_ARCHS}.get(arch)
        if activation is None:
            raise SAEError(f"{folder}: unknown transcoder architecture {arch!r}; supported: "
                           f"{', '.join(TRANSCODER_ARCHS)}")
        return _transcoder(folder, cfg, w, weights_file, site, hook_out, activation)
    activation = {"standard": "relu", "relu": "relu", "topk": "topk", "jumprelu": "jumprelu"}.get(
        arch if arch != "standard" else cfg.get("activation_fn_str", cfg.get("activation_fn", "relu")))
    if activation is None:
        raise SAEError(f"{folder}: unknown SAE activation/architecture {arch!r}; "
                       f"supported: {', '.join(ACTIVATIONS)}")
    k = _activation_k(cfg, w, activation, folder, weights_file, "SAE")
    hook = site or cfg.get("hook_name") or (cfg.get("metadata") or {}).get("hook_name")
    info = SAEInfo(_check_site(hook, folder), w["W_enc"].shape[0], w["W_enc"].shape[1], activation,
                   k, bool(cfg.get("apply_b_dec_to_input", False)), str(folder),
                   _sha256([folder / "cfg.json", weights_file]), cfg)
    return SparseAutoencoder(info, _check_shapes(w, folder))


def _activation_k(cfg: dict, w: dict, activation: str, folder: Path, weights_file: Path,
                  kind: str) -> int | None:
    """TopK's k from cfg.json (None otherwise); checks a JumpReLU has its threshold."""
    k = (cfg.get("activation_fn_kwargs") or {}).get("k", cfg.get("k"))
    if activation == "topk" and not k:
        raise SAEError(f"{folder}: a topk {kind} needs k in cfg.json")
    if activation == "jumprelu" and "threshold" not in w:
        raise SAEError(f"{weights_file}: a jumprelu {kind} needs a threshold tensor")
    return int(k) if k else None


def _transcoder(folder: Path, cfg: dict, w: dict, weights_file: Path, site: str | None,
                hook_out: str | None, activation: str) -> Transcoder:
    meta = cfg.get("metadata") or {}
    hook = site or cfg.get("hook_name") or meta.get("hook_name")
    m = TRANSCODER_IN_RE.match(hook or "")
    if not m:
        raise SAEError(f"{folder}: a transcoder must read an MLP's input (blocks.L.ln2.hook_normalized), "
                       f"not {hook!r}")
    if hook_out and hook_out != f"blocks.{m.group(1)}.hook_mlp_out":
        raise SAEError(f"{folder}: a transcoder reading {hook} must write blocks.{m.group(1)}.hook_mlp_out, "
                       f"not {hook_out!r}")
    k = _activation_k(cfg, w, activation, folder, weights_file, "transcoder")
    site = f"blocks.{m.group(1)}.ln2.hook_normalized"
    info = SAEInfo(site, w["W_enc"].shape[0], w["W_enc"].shape[1], activation, k,
                   bool(cfg.get("apply_b_dec_to_input", False)), str(folder),
                   _sha256([folder / "cfg.json", weights_file]), {**cfg, "kind": "transcoder"},
                   kind="transcoder")
    return Transcoder(info, _check_shapes(w, folder))


def _load_openai(folder: Path, pt: Path, site: str | None) -> SparseAutoencoder:
    state = torch.load(pt, map_location="cpu", weights_only=True)
    need = {"pre_bias", "encoder.weight", "latent_bias", "decoder.weight"}
    if not isinstance(state, dict) or need - set(state):
        raise SAEError(f"{pt} is not an OpenAI sparse_autoencoder state dict (needs {sorted(need)})")
    act = state.get("activation", "TopK")
    if str(act).lower() not in ("topk", "relu"):
        raise SAEError(f"{pt}: unknown activation {act!r}; supported: TopK, ReLU")
    k = (state.get("activation_state_dict") or {}).get("k")
    k = int(k.item() if torch.is_tensor(k) else k) if k is not None else None
    if str(act).lower() == "topk" and not k:
        raise SAEError(f"{pt}: a TopK autoencoder needs activation_state_dict.k")
    w = {"W_enc": state["encoder.weight"].T.contiguous(), "b_enc": state["latent_bias"],
         "W_dec": state["decoder.weight"].T.contiguous(), "b_dec": state["pre_bias"]}
    info = SAEInfo(_check_site(site, folder), w["W_enc"].shape[0], w["W_enc"].shape[1],
                   str(act).lower(), k, True, str(folder), _sha256([pt]),
                   {"layout": "openai", "activation": str(act), "k": k})
    return SparseAutoencoder(info, _check_shapes(w, folder))


def _check_site(site: str | None, folder: Path) -> str:
    if not site:
        raise SAEError(f"{folder}: no hook_name in the SAE's config; give --sae-site")
    if not SITE_RE.match(site):
        raise SAEError(f"{folder}: cannot splice at {site!r}; sites: blocks.L.hook_resid_pre|"
                       "hook_resid_mid|hook_resid_post|hook_attn_out|hook_mlp_out")
    return site


def _check_shapes(w: dict, folder: Path) -> dict:
    if w["W_enc"].ndim != 2:
        raise SAEError(f"{folder}: W_enc has shape {tuple(w['W_enc'].shape)}, expected [d_in, d_sae]")
    d_in, d_sae = w["W_enc"].shape
    want = {"b_enc": (d_sae,), "W_dec": (d_sae, d_in), "b_dec": (d_in,)}
    for name, shape in want.items():
        if tuple(w[name].shape) != shape:
            raise SAEError(f"{folder}: {name} has shape {tuple(w[name].shape)}, expected {shape} "
                           f"for W_enc {tuple(w['W_enc'].shape)}")
    for name, t in w.items():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise SAEError(f"{folder}: {name} holds NaN or infinite values")
    return {k: v.float() for k, v in w.items()}


def splice(model: HookedTransformer, sae: SparseAutoencoder) -> None:
    """Replace the site's value by latents + error (exact), adding the SAE's hook sites; a
    transcoder replaces its layer's MLP output the same way."""
    site = sae.info.site
    if site not in model.hook_points:
        raise SAEError(f"{site!r} is not a hook site of this model ({model.cfg.n_layers} layers)")
    if sae.info.d_in != model.cfg.d_model:
        raise SAEError(f"SAE {sae.info.source} reads {sae.info.d_in} dims but {site} has "
                       f"{model.cfg.d_model}")
    if sae.W_dec.shape[1] != model.cfg.d_model:
        raise SAEError(f"SAE {sae.info.source} writes {sae.W_dec.shape[1]} dims but "
                       f"{model.cfg.d_model} are needed")
    if any(s.info.layer == sae.info.layer for s in spliced(model)):
        raise SAEError(f"an SAE or transcoder is already spliced in layer {sae.info.layer}: one per layer")
    if site.endswith("hook_resid_mid") and model.cfg.parallel:
        raise SAEError(f"{site}: a parallel block's MLP does not read resid_mid; splice at "
                       "hook_resid_pre or hook_resid_post")
    sae = sae.to(device=model.device, dtype=model.W_E.dtype)
    if sae.info.kind == "transcoder":
        model.blocks[sae.info.layer].transcoder = sae
    else:
        model.hook_points[site].sae = sae
    model.index_hook_points()


def spliced(model: HookedTransformer) -> list[SparseAutoencoder]:
    """The spliced autoencoders and transcoders, by layer."""
    saes = [hp.sae for hp in model.hook_points.values() if getattr(hp, "sae", None) is not None]
    saes += [b.transcoder for b in model.blocks if b.transcoder is not None]
    return sorted(saes, key=lambda s: s.info.layer)


def at(model: HookedTransformer, layer: int) -> SparseAutoencoder | None:
    """The autoencoder or transcoder spliced in `layer`, if any."""
    return next((s for s in spliced(model) if s.info.layer == layer), None)
