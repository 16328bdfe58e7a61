"""Autoencoders saved by the sae-lens package itself load and encode as sae-lens does."""

from __future__ import annotations

import pytest
import torch

from actwh.compute.loading import load_model
from actwh.compute.sae import load_sae, splice

from conftest import PROMPTS, padded_batch

sae_lens = pytest.importorskip("sae_lens", reason="the saelens extra is not installed")


def build(kind: str, d: int, d_sae: int):
    from sae_lens.saes import (JumpReLUSAE, JumpReLUSAEConfig, JumpReLUTranscoder,
                               JumpReLUTranscoderConfig, StandardSAE, StandardSAEConfig, TopKSAE,
                               TopKSAEConfig, Transcoder, TranscoderConfig)

    if kind == "standard":
        sae = StandardSAE(StandardSAEConfig(d_in=d, d_sae=d_sae, apply_b_dec_to_input=True))
    elif kind == "topk":
        sae = TopKSAE(TopKSAEConfig(d_in=d, d_sae=d_sae, k=5))
    elif kind == "jumprelu":
        sae = JumpReLUSAE(JumpReLUSAEConfig(d_in=d, d_sae=d_sae))
    elif kind == "transcoder":
        sae = Transcoder(TranscoderConfig(d_in=d, d_sae=d_sae, d_out=d, apply_b_dec_to_input=False))
    else:
        sae = JumpReLUTranscoder(JumpReLUTranscoderConfig(d_in=d, d_sae=d_sae, d_out=d,
                                                          apply_b_dec_to_input=False))
    g = torch.Generator().manual_seed(len(kind))
    with torch.no_grad():  # every parameter random, so no bias or threshold hides behind zeros
        for name, p in sae.named_parameters():
            p.copy_(torch.rand(p.shape, generator=g) * 0.2 if name == "threshold"
                    else torch.randn(p.shape, generator=g) * 0.3)
    return sae


@pytest.mark.parametrize("kind", ["standard", "topk", "jumprelu", "transcoder", "jumprelu_transcoder"])
def test_saelens_saved_autoencoder_gives_saelens_latents(kind, gpt2_dir, tmp_path):
    loaded = load_model(gpt2_dir, device="cpu", dtype=torch.float32)
    model = loaded.model
    d = model.cfg.d_model
    theirs = build(kind, d, 24)
    transcoder = "transcoder" in kind
    site = "blocks.1.ln2.hook_normalized" if transcoder else "blocks.1.hook_resid_pre"
    theirs.cfg.metadata.hook_name = site
    if transcoder:
        theirs.cfg.metadata.hook_name_out = "blocks.1.hook_mlp_out"
    theirs.save_model(tmp_path / kind)
    ours = load_sae(tmp_path / kind)
    assert ours.info.site == site and ours.info.kind == ("transcoder" if transcoder else "sae")
    tokens, mask = padded_batch(loaded.tokenizer, PROMPTS)
    # What the autoencoder reads, from the unspliced model: the residual stream, or the MLP's input.
    grabbed = {}
    with torch.no_grad(), model.hooks(fwd=[("blocks.1.hook_resid_mid" if transcoder else site,
                                            lambda t, n: grabbed.__setitem__("x", t))]):
        before = model(tokens, mask)
    x = model.blocks[1].ln2(grabbed["x"]) if transcoder else grabbed["x"]
    with torch.no_grad():
        want = theirs.encode(x)
    splice(model, ours)
    prefix = ours.info.prefix
    cache = model.run_with_cache(tokens, [prefix + ".hook_latents"], attention_mask=mask)
    assert (cache.logits - before).abs().max() <= 1e-5
    got = cache.acts[prefix + ".hook_latents"]
    assert (want != 0).any() and (want == 0).any()
    assert torch.allclose(got, want, atol=1e-5)
    assert torch.allclose(ours.decode(got), theirs.decode(want), atol=1e-5)
