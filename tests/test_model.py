"""The hooked model against Hugging Face `transformers`, on tiny random checkpoints of every family."""

from __future__ import annotations

import json

import pytest
import torch

from actwh.compute.loading import SUPPORTED, load_model
from actwh.errors import ActwhError, ModelLoadError, PromptError, UnsupportedArchitecture

from conftest import PROMPTS, ROPE_FAMILIES, hf_config, padded_batch, save_tiny


def hf_logits(hf, tokens, mask):
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        return hf(input_ids=tokens, attention_mask=mask, position_ids=pos).logits


def check_logits(loaded, hf, side):
    tokens, mask = padded_batch(loaded.tokenizer, PROMPTS, side)
    with torch.no_grad():
        ours = loaded.model(tokens, mask)
    theirs = hf_logits(hf, tokens, mask)
    real = mask.bool()
    assert (ours[real] - theirs[real]).abs().max() <= 1e-4
    # Each prompt of the batch equals the same prompt run alone, and transformers' run alone.
    for i, text in enumerate(PROMPTS):
        alone = torch.tensor([loaded.tokenizer(text).input_ids])
        with torch.no_grad():
            single = loaded.model(alone)[0]
        assert (ours[i][real[i]] - single).abs().max() <= 1e-4
        assert (hf_logits(hf, alone, torch.ones_like(alone))[0] - single).abs().max() <= 1e-4


@pytest.mark.parametrize("side", ["right", "left"])
def test_logits_match_transformers_on_padded_batch(tiny_model, hf_model, side):
    check_logits(tiny_model, hf_model, side)


@pytest.mark.parametrize("family", ROPE_FAMILIES)
def test_rope_types_match_transformers(tmp_path, family):
    import transformers as T

    folder = save_tiny(family, tmp_path)
    loaded = load_model(folder, device="cpu")
    assert loaded.model.cfg.rope.type == family[len("rope_"):]
    hf = T.AutoModelForCausalLM.from_pretrained(folder, attn_implementation="eager").eval()
    for side in ("right", "left"):
        check_logits(loaded, hf, side)


def test_longrope_switches_to_long_factors_past_the_original_context(tmp_path):
    """Phi-3's longrope: short factors while the batch's longest position is inside
    original_max_position_embeddings, long ones past it, as transformers picks them."""
    import transformers as T

    folder = save_tiny("phi3", tmp_path)
    loaded = load_model(folder, device="cpu")
    hf = T.AutoModelForCausalLM.from_pretrained(folder, attn_implementation="eager").eval()
    original = loaded.model.cfg.rope.original_max
    tokens = torch.randint(3, 40, (2, original + 7))
    mask = torch.ones_like(tokens)
    mask[1, :10] = 0  # left padding: this row's positions stay inside the original context
    with torch.no_grad():
        ours = loaded.model(tokens, mask)
    assert (ours[mask.bool()] - hf_logits(hf, tokens, mask)[mask.bool()]).abs().max() <= 1e-4
    with torch.no_grad():  # the short row alone uses the short factors: a different result
        alone = loaded.model(tokens[1:, 10:])
    assert (ours[1, 10:] - alone).abs().max() > 1e-3


def test_identity_hooks_change_nothing_and_raising_hook_leaves_no_handle(tiny_model):
    model = tiny_model.model
    tokens, mask = padded_batch(tiny_model.tokenizer, PROMPTS)
    with torch.no_grad():
        clean = model(tokens, mask)
        seen = []
        with model.hooks(fwd=[(n, lambda t, n: seen.append(n)) for n in model.hook_points]):
            hooked = model(tokens, mask)
    assert torch.equal(clean, hooked)
    assert set(seen) == set(model.hook_points)

    def boom(t, name):
        raise RuntimeError("hook failed")

    with pytest.raises(RuntimeError, match="hook failed"):
        with torch.no_grad(), model.hooks(fwd=[("blocks.0.hook_resid_mid", boom)]):
            model(tokens, mask)
    for hp in model.hook_points.values():
        assert not hp._forward_hooks and not hp._backward_hooks
    with torch.no_grad():
        assert torch.equal(model(tokens, mask), clean)


def last_token_logit(mask, token_id=5):
    last = mask.shape[1] - 1 - mask.flip(-1).argmax(-1)  # left or right padding

    def metric(logits):
        return logits[torch.arange(len(last)), last, token_id].sum()
    return metric


def test_run_with_cache_gradients_match_independent_autograd(tiny_model, hf_model):
    model, cfg = tiny_model.model, tiny_model.model.cfg
    tokens, mask = padded_batch(tiny_model.tokenizer, PROMPTS, "left")
    names = ["blocks.1.hook_resid_pre", "blocks.0.mlp.hook_post", "blocks.1.attn.hook_pattern",
             "blocks.0.attn.hook_z"]
    metric = last_token_logit(mask)
    cache = model.run_with_cache(tokens, names, attention_mask=mask, backward_of=metric)
    assert set(cache.acts) == set(names) and set(cache.grads) == set(names)
    # Against transformers: its hidden_states[1] is the input of layer 1.
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    out = hf_model(input_ids=tokens, attention_mask=mask, position_ids=pos,
                   output_hidden_states=True)
    h1 = out.hidden_states[1]
    (g_hf,) = torch.autograd.grad(metric(out.logits), [h1])
    real = mask.bool()
    assert (cache.grads["blocks.1.hook_resid_pre"][real] - g_hf[real]).abs().max() <= 1e-4
    # Against plain autograd on tensors captured by a forward hook.
    captured = {}
    with torch.enable_grad(), model.hooks(fwd=[(n, lambda t, n: captured.__setitem__(n, t))
                                               for n in names]):
        logits = model(tokens, mask)
    grads = torch.autograd.grad(metric(logits), [captured[n] for n in names])
    for n, g in zip(names, grads):
        assert torch.allclose(cache.grads[n], g, atol=1e-6), n
        assert torch.allclose(cache.acts[n], captured[n].detach()), n


def test_backward_hooks_see_the_same_gradient(tiny_model):
    model = tiny_model.model
    tokens, mask = padded_batch(tiny_model.tokenizer, PROMPTS)
    site = "blocks.0.hook_mlp_out"
    cache = model.run_with_cache(tokens, [site], attention_mask=mask,
                                 backward_of=last_token_logit(mask))
    seen = {}
    with model.hooks(bwd=[(site, lambda g, n: seen.__setitem__(n, g))]):
        with torch.enable_grad():
            last_token_logit(mask)(model(tokens, mask)).backward()
    assert torch.allclose(seen[site], cache.grads[site], atol=1e-6)
    assert not model.hook_points[site]._forward_hooks


def expected_shape(name: str, cfg, b: int, p: int):
    leaf = name.split(".")[-1]
    if ".q_norm." in name or ".k_norm." in name:
        heads = cfg.n_heads if ".q_norm." in name else cfg.n_kv_heads
        if cfg.qk_norm == "head":
            return (b, p, heads, 1) if leaf == "hook_scale" else (b, p, heads, cfg.d_head)
        return (b, p, 1) if leaf == "hook_scale" else (b, p, heads * cfg.d_head)
    if leaf == "hook_logits_raw":
        return (b, p, cfg.d_vocab)
    if leaf == "hook_scale":
        return (b, p, 1)
    if leaf in ("hook_q", "hook_z"):
        return (b, p, cfg.n_heads, cfg.d_head)
    if leaf in ("hook_k", "hook_v"):
        return (b, p, cfg.n_kv_heads, cfg.d_head)
    if leaf in ("hook_attn_scores", "hook_pattern"):
        return (b, cfg.n_heads, p, p)
    if leaf in ("hook_pre", "hook_post", "hook_pre_linear"):  # every expert's neurons side by side
        return (b, p, cfg.n_experts * cfg.d_mlp + cfg.d_shared if cfg.n_experts else cfg.d_mlp)
    if leaf in ("hook_router_logits", "hook_expert_weights"):
        return (b, p, cfg.n_experts)
    if leaf == "hook_routing":
        return (b, p, cfg.n_experts + (1 if cfg.d_shared else 0))
    return (b, p, cfg.d_model)


def test_every_site_has_its_documented_shape(tiny_model):
    model = tiny_model.model
    tokens, mask = padded_batch(tiny_model.tokenizer, PROMPTS)
    cache = model.run_with_cache(tokens, list(model.hook_points), attention_mask=mask)
    b, p = tokens.shape
    for name, t in cache.acts.items():
        assert tuple(t.shape) == expected_shape(name, model.cfg, b, p), name


def test_loader_records_sha_and_arch(family_dir, tiny_model):
    import hashlib

    family, folder = family_dir
    data = (folder / "model.safetensors").read_bytes()
    assert tiny_model.info.weights_sha256 == hashlib.sha256(data).hexdigest()
    assert tiny_model.info.arch == hf_config(family).model_type


def test_bad_checkpoints_raise_typed_errors(tmp_path, family_dir):
    with pytest.raises(ModelLoadError, match="not found"):
        load_model(tmp_path / "nope")
    with pytest.raises(ModelLoadError, match="no config.json"):
        load_model(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(UnsupportedArchitecture) as err:
        load_model(tmp_path)
    assert all(s in str(err.value) for s in SUPPORTED)


def _edited_config(folder, dest, **changes):
    import shutil

    shutil.copytree(folder, dest)
    c = json.loads((dest / "config.json").read_text())
    c.update(changes)
    (dest / "config.json").write_text(json.dumps(c))
    return dest


def test_unsupported_configurations_are_one_line_errors_naming_the_field(tmp_path):
    folder = save_tiny("llama", tmp_path / "base")
    bad_rope = _edited_config(folder, tmp_path / "rope", rope_parameters={
        "rope_type": "proportional", "rope_theta": 10000.0})
    with pytest.raises(UnsupportedArchitecture, match="rope_type 'proportional'") as err:
        load_model(bad_rope, device="cpu")
    assert "\n" not in str(err.value) and "llama3" in str(err.value)
    vision = _edited_config(folder, tmp_path / "vision", model_type="gemma3",
                            vision_config={"model_type": "siglip_vision_model"})
    with pytest.raises(UnsupportedArchitecture, match="vision_config") as err:
        load_model(vision, device="cpu")
    assert "\n" not in str(err.value)
    moe = save_tiny("mixtral", tmp_path / "moe")
    router = _edited_config(moe, tmp_path / "router", scoring_func="sigmoid")
    with pytest.raises(UnsupportedArchitecture, match="scoring_func 'sigmoid'") as err:
        load_model(router, device="cpu")
    assert "\n" not in str(err.value)
    chunked = _edited_config(folder, tmp_path / "chunked", model_type="qwen2", sliding_window=4,
                             use_sliding_window=True,
                             layer_types=["chunked_attention", "full_attention"])
    with pytest.raises(ActwhError, match="layer_types|chunked_attention") as err:
        load_model(chunked, device="cpu")
    assert "\n" not in str(err.value)


def test_prompt_longer_than_context_is_refused(tiny_model):
    n = tiny_model.model.cfg.n_ctx + 1
    with pytest.raises(PromptError, match="longer than the context"):
        tiny_model.model(torch.zeros(1, n, dtype=torch.long))


def test_sharded_and_bin_checkpoints_load_identically(tmp_path):
    import transformers as T

    folder = save_tiny("gpt2", tmp_path / "base")
    hf = T.AutoModelForCausalLM.from_pretrained(folder)
    hf.save_pretrained(tmp_path / "sharded", max_shard_size="20KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").exists()
    torch.save(hf.state_dict(), (tmp_path / "bin").mkdir() or tmp_path / "bin" / "pytorch_model.bin")
    for sub in ("sharded", "bin"):
        for f in folder.iterdir():
            if f.name.startswith(("tokenizer", "special", "config")):
                (tmp_path / sub / f.name).write_bytes(f.read_bytes())
    base = load_model(folder, device="cpu").model
    tokens = torch.tensor([[0, 3, 4, 5, 6]])
    with torch.no_grad():
        want = base(tokens)
        for sub in ("sharded", "bin"):
            assert torch.equal(load_model(tmp_path / sub, device="cpu").model(tokens), want)


def test_sites_command_lists_each_familys_own_sites(tmp_path):
    """`actwh sites --model DIR` shows the per-family sites README documents."""
    from click.testing import CliRunner

    from actwh.cli.main import cli

    expected = {"gemma2": ["blocks.0.ln1_post.hook_scale", "blocks.1.ln2_post.hook_normalized",
                           "hook_logits_raw"],
                "qwen3": ["blocks.0.attn.q_norm.hook_scale", "blocks.1.attn.k_norm.hook_normalized"],
                "qwen2_moe": ["blocks.0.mlp.hook_router_logits", "blocks.0.mlp.hook_expert_weights",
                              "blocks.1.mlp.hook_routing"]}
    for family, names in expected.items():
        out = CliRunner().invoke(cli, ["sites", "--model", str(save_tiny(family, tmp_path / family))])
        assert out.exit_code == 0, out.output
        listed = out.output.split()
        assert all(n in listed for n in names), (family, names)
        assert "hook_logits_raw" not in listed or family == "gemma2"
