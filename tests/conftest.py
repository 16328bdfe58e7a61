"""Shared fixtures: tiny random checkpoints of every supported family, saved in Hugging Face
format and loaded through the real loading code."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# tiny models: a second thread only adds synchronisation. Set before torch is first imported
# (torch reads it then), and torch is imported lazily, so tests of the warehouse, the saved
# queries and circuits start without it.
os.environ.setdefault("OMP_NUM_THREADS", "1")


@pytest.fixture(scope="session", autouse=True)
def one_thread():
    import sys

    if "torch" in sys.modules:  # imported by the collected test modules
        sys.modules["torch"].set_num_threads(1)

WORDS = ("the a and to of in was he she it cat dog Mary John store gave drink went when "
         "then apple ball red blue one two three four five six seven eight nine ten , .").split()
VOCAB = ["<|endoftext|>", "<unk>", "<pad>"] + WORDS  # 41 ids; models use d_vocab 48


def make_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(VOCAB)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(
        single="<|endoftext|> $A", special_tokens=[("<|endoftext|>", 0)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|endoftext|>",
                                   eos_token="<|endoftext|>", unk_token="<unk>", pad_token="<pad>")


def hf_config(family: str):
    import transformers as T

    common = dict(vocab_size=48, bos_token_id=0, eos_token_id=0, pad_token_id=2)
    if family == "gpt2":
        return T.GPT2Config(n_layer=2, n_embd=32, n_head=4, n_positions=64, resid_pdrop=0,
                            embd_pdrop=0, attn_pdrop=0, **common)
    llama_like = dict(num_hidden_layers=2, hidden_size=32, num_attention_heads=4,
                      intermediate_size=48, max_position_embeddings=64, **common)
    if family == "gpt_neox":
        return T.GPTNeoXConfig(**llama_like, rotary_pct=0.5, hidden_dropout=0,
                               attention_dropout=0)
    if family == "llama":
        return T.LlamaConfig(**llama_like, num_key_value_heads=2, attention_bias=True,
                             mlp_bias=True)
    if family == "qwen2":
        return T.Qwen2Config(**llama_like, num_key_value_heads=2, tie_word_embeddings=True)
    if family == "mistral":  # a window shorter than the prompts exercises the sliding mask
        return T.MistralConfig(**llama_like, num_key_value_heads=1, sliding_window=5)
    if family == "llama3":  # Llama 3.2: llama3 rope scaling, tied embeddings
        return T.LlamaConfig(**llama_like, num_key_value_heads=2, tie_word_embeddings=True,
                             rope_parameters=dict(ROPE_VARIANTS["llama3"], rope_theta=500.0))
    if family == "qwen2_5":  # sliding window on the layers from max_window_layers on
        return T.Qwen2Config(**llama_like, num_key_value_heads=2, use_sliding_window=True,
                             sliding_window=4, max_window_layers=1)
    if family == "qwen3":  # per-head q/k RMSNorm; head_dim ≠ hidden / heads
        return T.Qwen3Config(**llama_like, num_key_value_heads=2, head_dim=12, attention_bias=True)
    if family == "phi3":  # fused qkv and gate_up, partial rotary, longrope (su), window
        return T.Phi3Config(**llama_like, num_key_value_heads=2, sliding_window=6,
                            original_max_position_embeddings=32,
                            rope_parameters=dict(ROPE_VARIANTS["longrope"], partial_rotary_factor=0.5))
    if family == "olmo2":  # no pre-norms: post-sublayer norms and q/k norm over all heads
        return T.Olmo2Config(**llama_like, num_key_value_heads=2)
    gemma = dict(llama_like, head_dim=12, num_key_value_heads=2, query_pre_attn_scalar=10,
                 sliding_window=4, hidden_activation="gelu_pytorch_tanh")
    if family == "gemma2":  # soft caps small enough to bend the logits they cap
        return T.Gemma2Config(**gemma, attn_logit_softcapping=2.0, final_logit_softcapping=3.0)
    if family == "gemma3":  # local then global layer, each with its own rope (global: linear)
        return T.Gemma3TextConfig(**gemma, layer_types=["sliding_attention", "full_attention"],
                                  rope_parameters={
                                      "sliding_attention": {"rope_type": "default", "rope_theta": 100.0},
                                      "full_attention": {"rope_type": "linear", "factor": 4.0,
                                                         "rope_theta": 1000.0}})
    moe = dict(llama_like, num_key_value_heads=2, num_experts_per_tok=2)
    if family == "mixtral":  # top-2 of 4 experts, renormalised
        return T.MixtralConfig(**dict(moe, intermediate_size=8), num_local_experts=4)
    if family == "qwen2_moe":  # top-2 of 4 (not renormalised) plus a gated shared expert
        return T.Qwen2MoeConfig(**moe, num_experts=4, moe_intermediate_size=8,
                                shared_expert_intermediate_size=12, norm_topk_prob=False)
    if family == "qwen3_moe":  # per-head q/k norm, top-2 of 4 renormalised
        return T.Qwen3MoeConfig(**moe, num_experts=4, moe_intermediate_size=8, head_dim=8,
                                norm_topk_prob=True)
    if family == "olmoe":  # q/k norm over all heads, top-2 of 4
        return T.OlmoeConfig(**dict(moe, intermediate_size=8), num_experts=4)
    if family.startswith("rope_"):  # Llama with each rope_type transformers ships
        kind = family[len("rope_"):]
        return T.LlamaConfig(**llama_like, num_key_value_heads=2,
                             rope_parameters=dict(ROPE_VARIANTS[kind], rope_theta=300.0))
    raise ValueError(family)


# rope_parameters per rope_type; factors and original contexts small enough to change frequencies
ROPE_VARIANTS = {
    "linear": {"rope_type": "linear", "factor": 3.0},
    "dynamic": {"rope_type": "dynamic", "factor": 2.0},
    "yarn": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16,
             "beta_fast": 8.0, "beta_slow": 1.0},
    "llama3": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 16},
    "longrope": {"rope_type": "longrope", "original_max_position_embeddings": 32,
                 "short_factor": [1.0, 1.5], "long_factor": [2.0, 4.0]},
}

FAMILIES = ["gpt2", "gpt_neox", "llama", "qwen2", "mistral", "llama3", "qwen2_5", "qwen3", "phi3",
            "olmo2", "gemma2", "gemma3", "mixtral", "qwen2_moe", "qwen3_moe", "olmoe"]
# logits parity only: each rope_type (llama3 and longrope are the llama3 and phi3 families)
ROPE_FAMILIES = ["rope_linear", "rope_dynamic", "rope_yarn"]


def save_tiny(family: str, folder, seed: int = 0):
    """A random checkpoint with non-trivial norms and biases, written by `save_pretrained`."""
    import torch
    import transformers as T

    torch.manual_seed(seed)
    cfg = hf_config(family)
    cfg._attn_implementation = "eager"
    model = T.AutoModelForCausalLM.from_config(cfg, attn_implementation="eager")
    with torch.no_grad():  # random norm weights and biases so no term hides behind 1s and 0s
        for name, p in model.named_parameters():
            if p.ndim == 1:
                p.add_(torch.randn_like(p) * 0.2)
            else:
                p.normal_(0, 0.2)
    model.save_pretrained(folder)
    make_tokenizer().save_pretrained(folder)
    return folder


@pytest.fixture(scope="session", params=FAMILIES)
def family_dir(request, tmp_path_factory):
    return request.param, save_tiny(request.param, tmp_path_factory.mktemp(request.param))


@pytest.fixture(scope="session")
def tiny_model(family_dir):
    from actwh.compute.loading import load_model

    return load_model(family_dir[1], device="cpu")


@pytest.fixture(scope="session")
def hf_model(family_dir):
    import transformers as T

    return T.AutoModelForCausalLM.from_pretrained(family_dir[1], attn_implementation="eager").eval()


def gain_sites(model, L):
    """Post-norm scale sites of layer L (empty for pre-norm-only families)."""
    return [f"blocks.{L}.{n}.hook_scale" for n in ("ln1_post", "ln2_post")
            if getattr(model.blocks[L], n, None) is not None]


def post_gain(model, acts, L, norm):
    """The post-norm `norm` ("ln1_post" / "ln2_post") of layer L as a frozen linear map's
    diagonal, w · scale [b, p, d]; 1 without post norms (the write is the raw output)."""
    ln = getattr(model.blocks[L], norm, None)
    return 1.0 if ln is None else acts[f"blocks.{L}.{norm}.hook_scale"] * ln.w


def direct_effect_sites(model):
    """What a test's own Ctx cache needs for g_final and frozen gains: the final norm's scale,
    every post-norm scale and, with a final-logit soft-cap, the uncapped logits."""
    return ["ln_final.hook_scale"] + [n for n in model.hook_points
                                      if n == "hook_logits_raw" or n.endswith("_post.hook_scale")]


def softcap_t(model, acts, r):
    """Per readout entry, logit / uncapped logit = cap · tanh(z / cap) / z (1 without a cap)."""
    import torch

    if not model.cfg.final_softcap:
        return 1.0
    z = acts["hook_logits_raw"][r.batch, r.pos, r.vocab]
    return model.cfg.final_softcap * torch.tanh(z / model.cfg.final_softcap) / z


def padded_batch(tokenizer, texts, side="right"):
    """Token ids and attention mask, padded on `side`."""
    import torch

    ids = [tokenizer(t).input_ids for t in texts]
    n = max(map(len, ids))
    pad = tokenizer.pad_token_id
    rows, masks = [], []
    for x in ids:
        fill = [pad] * (n - len(x))
        rows.append(x + fill if side == "right" else fill + x)
        m = [1] * len(x) + [0] * len(fill)
        masks.append(m if side == "right" else m[::-1])
    return torch.tensor(rows), torch.tensor(masks)


PROMPTS = ["when Mary and John went to the store , John gave a drink to",
           "the cat",
           "one two three four five six seven eight nine ten one two three"]


IOI_ROWS = [
    {"text": "when Mary and John went to the store , John gave a drink to", "target": "Mary",
     "distractor": "John", "corrupt": "when Mary and she went to the store , John gave a drink to"},
    {"text": "when John and Mary went to the store , Mary gave a ball to", "target": "John",
     "distractor": "Mary", "corrupt": "when John and he went to the store , Mary gave a ball to"},
    {"text": "the cat and the dog went to the store", "target": "cat", "distractor": "dog"},
    {"text": "one two three four", "target": "five", "distractor": "six"},
    {"text": "Mary gave the apple to John , then John gave the apple to", "target": "Mary",
     "distractor": "John"},
    {"text": "red blue red blue red", "target": "blue", "distractor": "red"},
]


def write_prompts(path, rows=IOI_ROWS, repeat: int = 1):
    import json

    path.write_text("".join(json.dumps(r) + "\n" for _ in range(repeat) for r in rows))
    return path


@pytest.fixture(scope="session")
def gpt2_dir(tmp_path_factory):
    return save_tiny("gpt2", tmp_path_factory.mktemp("gpt2_ckpt"))


@pytest.fixture
def warehouse(tmp_path):
    """A path for a fresh warehouse file."""
    return tmp_path / "wh.duckdb"
