"""Streaming, meta-device loading (compute/loading.py) against the loader actwh had before it:
build the model in float32 on the CPU, read every file whole, load the converted state dict,
cast to the target dtype. Both must give bit-identical weights, buffers and logits on every
family, from float32 and bfloat16 checkpoints, whole and sharded, in float32 and bfloat16."""

from __future__ import annotations

import hashlib
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from actwh.compute.loading import config_from_hf, load_model
from actwh.compute.model import HookedTransformer
from actwh.errors import ModelLoadError
from conftest import PROMPTS, padded_batch, save_tiny
from legacy_convert import convert  # b84f5c4's conversion, verbatim: independent of the code under test

TIED = {"gpt2", "qwen2", "llama3", "gemma2", "gemma3"}  # tie_word_embeddings in conftest's configs


def reference_load(folder, dtype):
    """The loader as it was (b84f5c4): float32 model on the CPU, whole state dict converted by
    that commit's own code, loaded, then cast."""
    c = json.loads((folder / "config.json").read_text())
    cfg = config_from_hf(c)
    index = folder / "model.safetensors.index.json"
    files = sorted({folder / f for f in json.loads(index.read_text())["weight_map"].values()}) \
        if index.exists() else [folder / "model.safetensors"]
    state = {}
    for f in files:
        state.update(load_file(f))
    model = HookedTransformer(cfg)
    model.load_state_dict(convert(cfg, c, state), strict=False)
    return model.to(dtype=dtype).eval()


def bf16_sharded(src, dest):
    """The checkpoint re-saved by transformers in bfloat16, cut into ~8 KB shards."""
    import transformers as T

    hf = T.AutoModelForCausalLM.from_pretrained(src, dtype=torch.bfloat16)
    hf.save_pretrained(dest, max_shard_size="8KB")
    for f in src.iterdir():
        if f.name.startswith(("tokenizer", "special")):
            (dest / f.name).write_bytes(f.read_bytes())
    return dest


@pytest.fixture(scope="module")
def checkpoints(family_dir, tmp_path_factory):
    family, folder = family_dir
    return family, {"fp32": folder,
                    "bf16-sharded": bf16_sharded(folder, tmp_path_factory.mktemp(f"{family}-bf16"))}


def assert_same_model(got, want):
    got_t = dict(got.named_parameters()) | dict(got.named_buffers())
    want_t = dict(want.named_parameters()) | dict(want.named_buffers())
    assert got_t.keys() == want_t.keys()
    for name, w in want_t.items():
        g = got_t[name]
        assert g.dtype == w.dtype and g.shape == w.shape and g.device == w.device, name
        assert torch.equal(g, w), name


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["to-fp32", "to-bf16"])
def test_streamed_load_is_bit_identical_to_the_old_loader(checkpoints, dtype):
    family, folders = checkpoints
    assert len(list(folders["bf16-sharded"].glob("*.safetensors"))) >= 3  # really sharded
    tokens, mask = None, None
    for kind, folder in folders.items():
        loaded = load_model(folder, device="cpu", dtype=dtype)
        want = reference_load(folder, dtype)
        assert_same_model(loaded.model, want)
        if tokens is None:
            tokens, mask = padded_batch(loaded.tokenizer, PROMPTS, side="left")
        with torch.no_grad():
            got_logits = loaded.model(tokens, mask)
            assert got_logits.dtype == dtype
            assert torch.equal(got_logits, want(tokens, mask))
        W_E, W_U = loaded.model.W_E, loaded.model.W_U
        assert torch.equal(W_U, W_E.T) == (family in TIED), kind


def test_sharded_sha_covers_every_shard_in_order(checkpoints):
    _, folders = checkpoints
    folder = folders["bf16-sharded"]
    shards = sorted(folder.glob("model-*.safetensors"))
    want = hashlib.sha256(b"".join(f.read_bytes() for f in shards)).hexdigest()
    assert load_model(folder, device="cpu").info.weights_sha256 == want


def test_float64_checkpoint_rounds_through_float32(tmp_path):
    folder = save_tiny("llama", tmp_path / "base")
    w = load_file(folder / "model.safetensors")
    save_file({k: v.double() for k, v in w.items()}, folder / "model.safetensors",
              metadata={"format": "pt"})
    for dtype in (torch.float32, torch.bfloat16):
        assert_same_model(load_model(folder, device="cpu", dtype=dtype).model,
                          reference_load(folder, dtype))


def _edit(folder, change):
    w = load_file(folder / "model.safetensors")
    change(w)
    save_file(w, folder / "model.safetensors", metadata={"format": "pt"})


def test_absent_biases_are_zero_absent_weights_and_bad_shapes_are_refused(tmp_path):
    folder = save_tiny("llama", tmp_path / "llama")  # attention_bias and mlp_bias: all present
    _edit(folder, lambda w: w.pop("model.layers.1.self_attn.q_proj.bias"))
    model = load_model(folder, device="cpu").model
    assert torch.equal(model.blocks[1].attn.b_Q, torch.zeros_like(model.blocks[1].attn.b_Q))
    assert model.blocks[0].attn.b_Q.abs().sum() > 0
    _edit(folder, lambda w: w.pop("model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(ModelLoadError, match="do not match its config.json.*up_proj"):
        load_model(folder, device="cpu")
    folder = save_tiny("gpt2", tmp_path / "gpt2")
    _edit(folder, lambda w: w.update({"lm_head.weight": w["transformer.wte.weight"][:, :7].contiguous()}))
    (folder / "config.json").write_text(json.dumps(
        {**json.loads((folder / "config.json").read_text()), "tie_word_embeddings": False}))
    with pytest.raises(ModelLoadError, match=r"W_U has shape \[7, 48\]"):
        load_model(folder, device="cpu")


def test_a_tensor_no_conversion_reads_is_still_checked_for_nan(tmp_path):
    folder = save_tiny("gpt2", tmp_path / "gpt2")
    _edit(folder, lambda w: w.update({"transformer.h.0.attn.masked_bias": torch.tensor(float("nan"))}))
    with pytest.raises(ModelLoadError, match="h.0.attn.masked_bias holds NaN"):
        load_model(folder, device="cpu")


def test_a_damaged_shard_is_refused_naming_it(checkpoints, tmp_path):
    import shutil

    _, folders = checkpoints
    folder = shutil.copytree(folders["bf16-sharded"], tmp_path / "damaged")
    shard = sorted(folder.glob("model-*.safetensors"))[1]
    shard.write_bytes(shard.read_bytes()[:-10])
    with pytest.raises(ModelLoadError, match=f"{shard.name}: damaged or not a weights file"):
        load_model(folder, device="cpu")


def test_a_dtype_actwh_does_not_read_is_named(tmp_path):
    folder = save_tiny("gpt2", tmp_path / "gpt2")
    _edit(folder, lambda w: w.update({"transformer.h.0.attn.extra": torch.zeros(3, dtype=torch.uint16)}))
    with pytest.raises(ModelLoadError, match="h.0.attn.extra has dtype U16, which actwh does not read"):
        load_model(folder, device="cpu")
