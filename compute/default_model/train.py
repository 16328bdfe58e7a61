"""Train the embedded default model: `python -m actwh.compute.default_model.train`.

A GPT-2-architecture model on the generated corpus (corpus.py): from scratch with a drill
curriculum that advances on reached accuracy, not on the clock, or (`--init`) continued from a
saved model straight on the full mix, which is how the shipped weights were made (see their model
card). Options shape the model for crisp circuits: attention-only layers (`--attn-only`),
sinusoidal position starts, and a planted, optionally frozen, previous-token head. Step-based and
deterministic for a given command and thread count. Writes config.json, model.safetensors, the
tokenizer files, train_log.jsonl (the training curve) and train_summary.json (the recipe and the
best checkpoint's figures) in Hugging Face format.
"""

from __future__ import annotations

import argparse
import json
import logging
import random
import shlex
import sys
import time
from pathlib import Path

import torch

from actwh.compute.default_model.corpus import (
    ORDERS, SPECIAL_TOKENS, Corpus, NameSplit, all_words, ioi_prompt,
)

log = logging.getLogger("actwh.train")
WEIGHTS_DIR = Path(__file__).parent / "weights"
BOS = "<|endoftext|>"

# (name, mix of document kinds, copy alphabet, probe metric, probe goal that ends the stage,
# step cap). A stage ends when its probe reaches the goal or at its cap. Measured here (batch 16,
# attention-only first layer): copy drills alone left every previous-token score near 0.2 for
# 800 steps; with the skip drill (`x r x`) a layer-0 head reached 0.7 within 600 steps, but it
# faded to 0.3 once the drills moved to the whole vocabulary before in-context copying had formed,
# so the first stage now waits for copying on small alphabets and the skip drill stays in the mix.
# A planted previous-token head with frozen query, key and position code (3 layers, attention-only
# first layer) kept its score at 1.0, but copying on 64-word alphabets was still at 0.12 after
# 1,200 steps: on this shared CPU no from-scratch run reached induction in the time there was.
STAGES = [
    ("drill-64", {"skip": 0.3, "copy": 0.7}, 64, "copy_alphabet64", 0.8, 3000),
    ("drill-256", {"skip": 0.2, "copy": 0.5, "induction": 0.3}, 256, "copy_alphabet512", 0.8, 1500),
    ("mix", {"ioi": 0.35, "induction": 0.25, "copy": 0.1, "skip": 0.1, "successor": 0.1,
             "filler": 0.1}, 10_000, None, None, None),
]


def build_tokenizer(corpus_text: list[str]):
    """A word-level tokenizer trained on the corpus; every prompt starts with BOS."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(corpus_text, trainers.WordLevelTrainer(special_tokens=SPECIAL_TOKENS))
    bos_id = tok.token_to_id(BOS)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, bos_id)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=BOS, eos_token=BOS,
                                   unk_token="<unk>", pad_token="<pad>")


def head_scores(attentions, span_len: int) -> tuple[dict[str, float], dict[str, float]]:
    """Previous-token and induction scores of every head on [BOS, span, span] rows.

    previous-token: mean attention from each position 1..2L to the one before it; induction: mean
    attention from each token of the second copy to the token after its first occurrence.
    """
    n = span_len
    q = torch.arange(1, 2 * n + 1)
    qi = torch.arange(n + 1, 2 * n + 1)
    prev, ind = {}, {}
    for layer, pat in enumerate(attentions):  # [batch, head, query, key]
        for h in range(pat.shape[1]):
            prev[f"L{layer}H{h}"] = pat[:, h, q, q - 1].mean().item()
            ind[f"L{layer}H{h}"] = pat[:, h, qi, qi - n + 1].mean().item()
    return prev, ind


@torch.no_grad()
def evaluate(model, vocab: dict[str, int], split: NameSplit, seed: int, n: int = 200) -> dict:
    """Top-1 next-token accuracy on fresh seeded samples of each task, IOI for each name order on
    held-out name pairs and on names never seen in IOI; and the best previous-token and induction
    heads on whole-vocabulary spans (needs eager attention)."""
    model.eval()
    rng = random.Random(seed)
    bos = vocab[BOS]
    # sorted: a tokenizer's vocabulary dict comes back in a different order in every process
    words = sorted(w for w in vocab if w not in SPECIAL_TOKENS)

    def last_token_acc(prompts: list[list[str]], answers: list[str]) -> float:
        ids = [[bos] + [vocab[w] for w in p] for p in prompts]
        width = max(map(len, ids))
        # Right padding needs no mask in a causal model: the last real token never sees it.
        batch = torch.tensor([x + [0] * (width - len(x)) for x in ids])
        logits = model(batch).logits
        last = torch.tensor([len(x) - 1 for x in ids])
        pred = logits[torch.arange(len(ids)), last].argmax(-1)
        return (pred == torch.tensor([vocab[a] for a in answers])).float().mean().item()

    def ioi_acc(pairs, order: str) -> float:
        prompts = [ioi_prompt(rng, a, b, order) for a, b in pairs]
        return last_token_acc([p.words for p in prompts], [p.io for p in prompts])

    held = sorted(split.held_out_pairs)
    unseen = split.unseen_names
    metrics = {}
    for order in ORDERS:
        metrics[f"ioi_{order.lower()}_held_out_pairs"] = ioi_acc(
            [rng.sample(rng.choice(held), 2) for _ in range(n)], order)
        metrics[f"ioi_{order.lower()}_unseen_names"] = ioi_acc(
            [rng.sample(unseen, 2) for _ in range(n)], order)
    for span_len, alphabet, key in [(10, len(words), "induction_span10"),
                                   (25, len(words), "induction_span25"),
                                   (12, 64, "copy_alphabet64"), (12, 512, "copy_alphabet512")]:
        letters = rng.sample(words, min(alphabet, len(words)))
        spans = torch.tensor([[vocab[rng.choice(letters)] for _ in range(span_len)]
                              for _ in range(n)])
        batch = torch.cat([torch.full((n, 1), bos), spans, spans], dim=1)
        out = model(batch, output_attentions=key == "induction_span10")
        pred = out.logits.argmax(-1)
        # Predictions of the second copy's tokens 2..L: positions L+1 .. 2L-1 predict them.
        hits = pred[:, span_len + 1: 2 * span_len] == batch[:, span_len + 2:]
        metrics[key] = hits.float().mean().item()
        if key == "induction_span10":
            prev, ind = head_scores(out.attentions, span_len)
            top_ind = max(ind, key=ind.get)
            below = [h for h in prev if int(h[1:h.index("H")]) < int(top_ind[1:top_ind.index("H")])]
            top_prev = max(below, key=prev.get) if below else max(prev, key=prev.get)
            metrics.update(induction_head=top_ind, induction_score=ind[top_ind],
                           previous_token_head=top_prev, previous_token_score=prev[top_prev])
    model.train()
    return metrics


IOI_KEYS = [f"ioi_{o.lower()}_{c}" for o in ORDERS for c in ("held_out_pairs", "unseen_names")]


def checkpoint_score(m: dict) -> float:
    """What the best checkpoint maximises: the worst of IOI in each order and condition and
    induction on 10-word spans, less 1 while no previous-token head below the induction head
    reaches 0.7."""
    return min(*(m[k] for k in IOI_KEYS), m["induction_span10"]) - (
        0.0 if m["previous_token_score"] >= 0.7 else 1.0)


def zero_mlp(model, layer: int) -> None:
    """Make block `layer`'s MLP output exactly zero and keep it so (weights zero, frozen): an
    attention-only layer in GPT-2's own format, which plain transformers loads as it is."""
    mlp = model.transformer.h[layer].mlp
    for p in mlp.parameters():
        p.data.zero_()
        p.requires_grad_(False)


def sinusoidal_init(model) -> None:
    """Start the learned position embeddings at the sinusoids of Vaswani et al. (scaled to the
    token embeddings' norm): the embedding of p - 1 is a fixed rotation of that of p, so a head
    that attends to the previous token is one linear map away. They train freely after."""
    wpe = model.transformer.wpe.weight
    n, d = wpe.shape
    pos = torch.arange(n, dtype=torch.float32)[:, None]
    freq = torch.exp(-torch.arange(0, d, 2, dtype=torch.float32) * (torch.log(torch.tensor(1e4)) / d))
    pe = torch.zeros(n, d)
    pe[:, 0::2], pe[:, 1::2] = torch.sin(pos * freq), torch.cos(pos * freq)
    with torch.no_grad():
        wpe.copy_(pe * model.transformer.wte.weight.norm(dim=1).mean() / pe.norm(dim=1).mean())


def plant_previous_token_head(model, head: int = 0, gain: float = 5.0) -> None:
    """Start head `head` of layer 0 as a previous-token head (it trains freely after).

    The position embeddings start as 16 sinusoid pairs (sin, cos of p·ω_i) in the first 32
    residual dimensions, which the token embeddings start without; the head's key reads that
    subspace as it is and its query rotates each pair by -ω_i, so q_p · k_j = Σ_i cos(ω_i (p-1-j)):
    largest at j = p - 1. Its value and output weights keep their random start.
    """
    cfg = model.config
    d, dh = cfg.n_embd, cfg.n_embd // cfg.n_head
    if dh < 32 or d < 32:
        raise ValueError("planting a previous-token head needs d_model and d_head of at least 32")
    n = cfg.n_positions
    omega = torch.linspace(0.2, 3.0, 16)  # no slow pair: it would only add a shared offset
    p = torch.arange(n, dtype=torch.float32)[:, None]
    wte, wpe = model.transformer.wte.weight, model.transformer.wpe.weight
    attn = model.transformer.h[0].attn.c_attn.weight  # [d, 3d]: x @ W gives q | k | v
    with torch.no_grad():
        wte[:, :32] = 0
        amp = wte[:, 32:].norm(dim=1).mean() / 4  # the 16 pairs together as long as a token
        wpe.zero_()
        wpe[:, 0:32:2], wpe[:, 1:32:2] = amp * torch.sin(p * omega), amp * torch.cos(p * omega)
        q = attn[:, head * dh:(head + 1) * dh]
        k = attn[:, d + head * dh:d + (head + 1) * dh]
        q.zero_()
        k.zero_()
        c, s = torch.cos(omega), torch.sin(omega)
        for i in range(16):
            si, ci = 2 * i, 2 * i + 1  # residual (and head) dims of pair i: sin, cos
            q[si, si], q[ci, si], q[si, ci], q[ci, ci] = gain * c[i], -gain * s[i], gain * s[i], gain * c[i]
            k[si, si], k[ci, ci] = gain, gain
        model.transformer.h[0].attn.c_attn.bias[head * dh:(head + 1) * dh] = 0
        model.transformer.h[0].attn.c_attn.bias[d + head * dh:d + (head + 1) * dh] = 0


def freeze_query_key(model, layer: int, head: int) -> None:
    """Keep one head's query and key weights (and biases) at their start: its attention pattern
    is then a fixed function of the residual stream's position subspace; its value and output
    weights, and every other weight, train. A gradient hook zeroes their gradient, and AdamW's
    weight decay is undone for them after each step by `restore_frozen`."""
    attn = model.transformer.h[layer].attn.c_attn
    d = model.config.n_embd
    dh = d // model.config.n_head
    cols = torch.zeros(3 * d, dtype=torch.bool)
    cols[head * dh:(head + 1) * dh] = True
    cols[d + head * dh:d + (head + 1) * dh] = True
    attn.weight.register_hook(lambda g: g.masked_fill(cols[None, :], 0.0))
    attn.bias.register_hook(lambda g: g.masked_fill(cols, 0.0))
    model._frozen = getattr(model, "_frozen", []) + [(attn.weight, attn.weight.detach()[:, cols].clone(), (slice(None), cols)),
                     (attn.bias, attn.bias.detach()[cols].clone(), (cols,))]


def freeze_position_code(model) -> None:
    """Keep the planted position code fixed: the position embeddings, and the token embeddings'
    first 32 dimensions at zero, so layer 0's planted head keeps reading positions only."""
    wte, wpe = model.transformer.wte.weight, model.transformer.wpe.weight
    wpe.requires_grad_(False)
    cols = torch.zeros(wte.shape[1], dtype=torch.bool)
    cols[:32] = True
    wte.register_hook(lambda g: g.masked_fill(cols[None, :], 0.0))
    model._frozen = getattr(model, "_frozen", []) + [
        (wte, wte.detach()[:, cols].clone(), (slice(None), cols))]


def previous_token_attention_loss(attentions, layer: int, head: int) -> torch.Tensor:
    """Cross-entropy of one head's attention pattern against "attend to the previous token":
    the mean over rows and over positions 1..n-1 of -log(attention from p to p - 1). Added to
    the language-model loss (`--supervise-previous-token`), it makes that head a previous-token
    head while every weight, its own included, keeps training on the task."""
    pat = attentions[layer][:, head]  # [batch, query, key]
    q = torch.arange(1, pat.shape[-1], device=pat.device)
    return -torch.log(pat[:, q, q - 1].clamp_min(1e-9)).mean()


def induction_targets(rows: torch.Tensor) -> torch.Tensor:
    """For every position q of every row [batch, seq]: the position after the latest earlier
    occurrence j of q's token (j + 1 < q), where an induction head attends; -1 where the token
    has not occurred before (or only just before q)."""
    n = rows.shape[1]
    same = rows[:, :, None] == rows[:, None, :]  # [batch, q, j]
    q, j = torch.arange(n)[:, None], torch.arange(n)[None, :]
    same &= (j + 1 < q)[None]
    last = torch.where(same, j[None].expand_as(same), -1).max(-1).values  # [batch, q]
    return torch.where(last >= 0, last + 1, -1)


def induction_attention_loss(attentions, rows: torch.Tensor, layer: int, head: int,
                             skip: int | None = None) -> torch.Tensor:
    """Cross-entropy of one head's attention pattern against "attend to the token after the
    previous occurrence of this one" (`induction_targets`), over the positions that have one
    (tokens equal to `skip`, the BOS, excluded): added to the language-model loss
    (`--supervise-induction`), it makes that head an induction head, and the model has to give
    its key what it needs (which token came before each position)."""
    pat = attentions[layer][:, head]  # [batch, query, key]
    target = induction_targets(rows.cpu()).to(pat.device)
    valid = target >= 0
    if skip is not None:
        valid &= rows.to(pat.device) != skip
    if not bool(valid.any()):
        return pat.sum() * 0.0
    b, q = valid.nonzero(as_tuple=True)
    return -torch.log(pat[b, q, target[b, q]].clamp_min(1e-9)).mean()


def init_summary(init: Path) -> dict | None:
    """The train_summary.json of the model a run continues from, with the one it continued from
    nested in it, and so on: the whole recipe of a model trained in several runs."""
    path = Path(init) / "train_summary.json"
    if not path.exists():
        return None
    summary = json.loads(path.read_text())
    if summary.get("init") and not summary.get("init_summary"):
        summary["init_summary"] = init_summary(Path(summary["init"]))
    return summary


def reinit_key(model, layer: int, head: int, seed: int) -> None:
    """Restart one head's key weights at GPT-2's initial scale (normal, std 0.02; bias zero),
    keeping every other weight: the head learns again which residual directions its key reads,
    from whatever the model now offers (e.g. a supervised previous-token head)."""
    attn = model.transformer.h[layer].attn.c_attn
    d = model.config.n_embd
    dh = d // model.config.n_head
    cols = slice(d + head * dh, d + (head + 1) * dh)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        attn.weight[:, cols] = torch.randn(d, dh, generator=g) * 0.02
        attn.bias[cols] = 0.0


def restore_frozen(model) -> None:
    with torch.no_grad():
        for param, value, index in getattr(model, "_frozen", []):
            param[index] = value


def train(out: Path, seed: int, steps: int, threads: int, batch: int, seq: int,
          minutes: float = 0.0, n_layer: int = 3, n_head: int = 4, d_model: int = 128,
          attn_only: tuple[int, ...] = (0,), lr_max: float = 3e-3, eval_every: int = 200,
          sinusoidal: bool = True, d_mlp: int | None = None, command: str = "",
          plant: bool = False, freeze_plant: bool = False, init: Path | None = None,
          stop_at: int | None = None, supervise: tuple[int, int] | None = None,
          supervise_weight: float = 1.0, abb_share: float = 0.5, snapshots: bool = False,
          reinit: tuple[int, int] | None = None,
          supervise_induction: tuple[int, int] | None = None) -> dict:
    """Train up to `steps` steps (the learning rate drops to 30% after 85% of them), stopping early
    once IOI (each order, held-out pairs and unseen names) and induction pass 0.98 with a
    previous-token head above 0.8. `supervise` (layer, head): add `supervise_weight` times
    that head's previous-token attention loss to the language-model loss;
    `supervise_induction` (layer, head): the same weight times that head's induction attention
    loss. `abb_share`: the
    share of IOI training sentences in the ABB order. minutes > 0: also stop at that wall-clock deadline (which makes
    the result depend on the machine's speed). Layers in `attn_only` have a zero, frozen MLP."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    torch.set_num_threads(threads)
    split = NameSplit.make(seed)
    words = all_words()
    sample = Corpus(seed + 1, split, words)
    # The tokenizer learns from generated text; the word lists guarantee every word occurs.
    corpus_text = [" ".join(sample.document(STAGES[-1][1], 10_000)) for _ in range(20_000)]
    corpus_text.append(" ".join(words))
    if init is None:
        tokenizer = build_tokenizer(corpus_text)
    else:  # continue from a saved model: its tokenizer, its weights, straight into the mix
        from transformers import PreTrainedTokenizerFast
        tokenizer = PreTrainedTokenizerFast.from_pretrained(init)
    vocab = tokenizer.get_vocab()
    gen = Corpus(seed + 2, split, words, abb_share=abb_share)

    config = GPT2Config(
        vocab_size=len(vocab), n_positions=seq, n_embd=d_model, n_layer=n_layer, n_head=n_head,
        n_inner=d_mlp,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, tie_word_embeddings=True,
        bos_token_id=vocab[BOS], eos_token_id=vocab[BOS], pad_token_id=vocab["<pad>"],
        attn_implementation="eager",  # faster than sdpa for this size on CPU (measured)
    )
    if init is None:
        model = GPT2LMHeadModel(config)
    else:
        model = GPT2LMHeadModel.from_pretrained(init, attn_implementation="eager")
    for layer in attn_only:
        zero_mlp(model, layer)
    if sinusoidal and not plant:
        sinusoidal_init(model)
    if plant:
        plant_previous_token_head(model)
    if reinit is not None:
        reinit_key(model, *reinit, seed=seed)
    if freeze_plant:
        freeze_query_key(model, layer=0, head=0)
        freeze_position_code(model)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr_max, betas=(0.9, 0.98), weight_decay=0.01)
    out.mkdir(parents=True, exist_ok=True)
    log_path = out / "train_log.jsonl"
    log_path.write_text("")
    recipe = {"seed": seed, "threads": threads, "batch": batch, "seq": seq, "steps": steps,
              "deadline_minutes": minutes, "n_layer": n_layer, "n_head": n_head,
              "d_model": d_model, "attn_only_layers": list(attn_only), "lr": lr_max,
              "sinusoidal_init": sinusoidal, "d_mlp": d_mlp or 4 * d_model, "command_args": command,
              "planted_previous_token_head": "L0H0" if plant else None,
              "frozen_query_key": "L0H0" if freeze_plant else None,
              "init": str(init) if init else None,
              "init_summary": init_summary(init) if init else None,
              "supervised_previous_token_head": f"L{supervise[0]}H{supervise[1]}" if supervise else None,
              "supervise_weight": supervise_weight if supervise or supervise_induction else None,
              "supervised_induction_head": (f"L{supervise_induction[0]}H{supervise_induction[1]}"
                                            if supervise_induction else None),
              "ioi_abb_share": abb_share,
              "reinitialised_key": f"L{reinit[0]}H{reinit[1]}" if reinit else None,
              "n_params": sum(p.numel() for p in model.parameters()),
              "n_trainable": sum(p.numel() for p in params)}

    stage, stage_start, buffer, step, best = 0 if init is None else len(STAGES) - 1, 0, [], 0, -1.0
    start = time.time()
    deadline = start + minutes * 60 if minutes > 0 else float("inf")
    while step < min(steps, stop_at or steps):
        if time.time() >= deadline:
            log.warning("stopped by the %s-minute deadline at step %d of %d", minutes, step, steps)
            break
        name, mix, alphabet, probe_name, goal, cap = STAGES[stage]
        while len(buffer) < batch * seq:
            buffer += [vocab[BOS]] + [vocab[w] for w in gen.document(mix, alphabet)]
        rows = torch.tensor(buffer[: batch * seq]).view(batch, seq)
        buffer = buffer[batch * seq:]
        lr = lr_max * min(1.0, (step + 1) / 200) * (0.3 if step > 0.85 * steps else 1.0)
        for g in opt.param_groups:
            g["lr"] = lr
        supervised = supervise is not None or supervise_induction is not None
        out_ = model(rows, labels=rows, output_attentions=supervised)
        loss = out_.loss
        if supervised:
            aux = sum(([previous_token_attention_loss(out_.attentions, *supervise)]
                       if supervise else []) +
                      ([induction_attention_loss(out_.attentions, rows, *supervise_induction,
                                                 skip=vocab[BOS])] if supervise_induction else []))
            loss_total = loss + supervise_weight * aux
        else:
            loss_total = loss
        opt.zero_grad(set_to_none=True)
        loss_total.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        restore_frozen(model)
        step += 1
        if step % eval_every == 0:
            m = evaluate(model, vocab, split, seed=10_000 + step)
            record = {"step": step, "minutes": round((time.time() - start) / 60, 2), "stage": name,
                      "loss": round(loss.item(), 4),
                      **({"aux_loss": round(aux.item(), 4)} if supervised else {}),
                      **{k: round(v, 4) if isinstance(v, float) else v for k, v in m.items()}}
            with log_path.open("a") as f:
                f.write(json.dumps(record) + "\n")
            log.info("%s", record)
            if snapshots:  # every evaluated model, for measurements the evaluation does not make
                model.save_pretrained(out / "snapshots" / f"step-{step}")
                tokenizer.save_pretrained(out / "snapshots" / f"step-{step}")
            if goal is not None and (m[probe_name] >= goal or step - stage_start >= cap):
                stage, stage_start = stage + 1, step
            if stage == len(STAGES) - 1:
                score = checkpoint_score(m)
                if score > best:
                    best = score
                    model.save_pretrained(out)
                    tokenizer.save_pretrained(out)
                    (out / "train_summary.json").write_text(json.dumps(
                        {**record, **recipe, "checkpoint_score": round(score, 4)}, indent=1))
                if all(m[k] >= 0.98 for k in IOI_KEYS) and m["induction_span10"] >= 0.98 \
                        and m["previous_token_score"] >= 0.8:
                    break
    return json.loads((out / "train_summary.json").read_text())


def parser() -> argparse.ArgumentParser:
    """The trainer's command line (the model card's reproduction commands use it)."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=WEIGHTS_DIR)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--steps", type=int, default=9500,
                    help="step budget; the learning rate drops after 85%% of it")
    ap.add_argument("--minutes", type=float, default=0.0,
                    help="optional wall-clock deadline (0: none; a deadline makes results "
                         "depend on the machine's speed)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--layers", type=int, default=3)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--d-model", type=int, default=128)
    ap.add_argument("--attn-only", default="0",
                    help="comma-separated layers whose MLP is zero and frozen ('' for none)")
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--eval-every", type=int, default=200)
    ap.add_argument("--d-mlp", type=int, default=None, help="MLP width (default 4 × d_model)")
    ap.add_argument("--plant-previous-token-head", action="store_true",
                    help="start L0H0 as a previous-token head (see plant_previous_token_head)")
    ap.add_argument("--freeze-planted", action="store_true",
                    help="keep the planted head's query and key weights fixed")
    ap.add_argument("--stop-at", type=int, default=None,
                    help="stop after this step (the schedule still follows --steps): reproduces a "
                         "best checkpoint of a longer run")
    ap.add_argument("--init", type=Path, default=None,
                    help="continue from this saved model (its tokenizer; starts in the mix)")
    ap.add_argument("--supervise-previous-token", default=None, metavar="LxHy",
                    help="add a loss on this head's attention: cross-entropy against attending "
                         "to the previous token (e.g. L0H2)")
    ap.add_argument("--supervise-induction", default=None, metavar="LxHy",
                    help="add a loss on this head's attention: cross-entropy against attending to "
                         "the token after the previous occurrence of the current one (e.g. L1H0)")
    ap.add_argument("--supervise-weight", type=float, default=1.0)
    ap.add_argument("--abb-share", type=float, default=0.5,
                    help="share of IOI training sentences that name the answer first")
    ap.add_argument("--reinit-key", default=None, metavar="LxHy",
                    help="restart this head's key weights before training (see reinit_key)")
    ap.add_argument("--snapshots", action="store_true",
                    help="also save the model at every evaluation, in OUT/snapshots/step-N")
    ap.add_argument("--no-sinusoidal", action="store_true",
                    help="start position embeddings at random instead of sinusoids")
    return ap


def main() -> None:
    ap = parser()
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    attn_only = tuple(int(x) for x in args.attn_only.split(",") if x.strip())
    def head(option: str, text: str | None) -> tuple[int, int] | None:
        import re
        if text is None:
            return None
        m = re.fullmatch(r"L(\d+)H(\d+)", text)
        if not m:
            ap.error(f"{option}: expected a head like L0H2, got {text!r}")
        return int(m.group(1)), int(m.group(2))

    supervise = head("--supervise-previous-token", args.supervise_previous_token)
    reinit = head("--reinit-key", args.reinit_key)
    induction = head("--supervise-induction", args.supervise_induction)
    print(json.dumps(train(args.out, args.seed, args.steps, args.threads, args.batch, args.seq,
                           args.minutes, args.layers, args.heads, args.d_model, attn_only,
                           args.lr, args.eval_every, not args.no_sinusoidal, args.d_mlp,
                           shlex.join(sys.argv[1:]), args.plant_previous_token_head,
                           args.freeze_planted, args.init, args.stop_at, supervise,
                           args.supervise_weight, args.abb_share, args.snapshots, reinit,
                           induction)))


if __name__ == "__main__":
    main()
