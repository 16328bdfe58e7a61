"""Measure the shipped default model with actwh itself and write its model card:
`python -m actwh.model_card`.

Tooling over the whole stack (populate, the warehouse, the saved queries, evaluate), so it lives
beside the runner, not in compute/, which knows nothing of DuckDB.

Everything the card states is measured here, on the shipped folder:
- accuracy (`train.evaluate`, plain transformers): IOI in each name order on held-out name pairs
  and on names never used in IOI, induction on whole-vocabulary spans, the best heads;
- the IOI tour of the README, run through `populate` (EAP-IG from the corrupted prompts) and
  `find_circuit` (influence pruning) on every prompt of `prompts/ioi.jsonl`: the clean and
  corrupted logit difference, how often each node is in a prompt's circuit, and what the circuit's
  heads do (attention from the final position to each name, duplicate-token attention, direct
  effect), per name order;
- the induction circuit: the saved queries `induction_heads` and `previous_token_heads` over
  `prompts/induction.jsonl`, and the rank of every edge into the induction head's key input.
"""

from __future__ import annotations

import json
import re
import tempfile
from collections import Counter
from pathlib import Path

from actwh.compute.default_model import PROMPTS, WEIGHTS

CARD = WEIGHTS / "MODEL_CARD.md"
CARD_JSON = WEIGHTS / "card.json"
# The README's IOI tour, as populate options (the test that runs the tour checks they agree).
TOUR_IG_STEPS = 5
# A node belongs to "the IOI circuit" when influence pruning keeps it in at least this share of
# the prompts' circuits.
CIRCUIT_SHARE = 0.75


def measure_accuracy(seed: int = 2026, n: int = 400) -> dict:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from actwh.compute.default_model.corpus import NameSplit
    from actwh.compute.default_model.train import evaluate

    model = AutoModelForCausalLM.from_pretrained(WEIGHTS, attn_implementation="eager").eval()
    vocab = AutoTokenizer.from_pretrained(WEIGHTS).get_vocab()
    return evaluate(model, vocab, NameSplit.make(0), seed=seed, n=n)


def ioi_rows() -> list[dict]:
    return [json.loads(line) for line in (PROMPTS / "ioi.jsonl").read_text().splitlines()]


def parse_head(label: str) -> tuple[int, int]:
    layer, head = re.fullmatch(r"L(\d+)H(\d+)", label).groups()
    return int(layer), int(head)


def ioi_tour(db: Path) -> dict:
    """The README's IOI tour on every shipped IOI prompt, summarised per node and per order."""
    from actwh.queries.circuit import find_circuit
    from actwh.runner import EdgeOptions, PopulateOptions, populate
    from actwh.warehouse import Warehouse

    rows = ioi_rows()
    run = populate(db, PopulateOptions(
        prompts=str(PROMPTS / "ioi.jsonl"),
        edges=EdgeOptions(baseline="corrupt", ig_steps=TOUR_IG_STEPS)), progress=False).run_id
    with Warehouse(db) as wh:
        prompts = wh.sql("SELECT prompt_id, metric, corrupt_metric FROM prompts WHERE run_id = $run "
                         "ORDER BY prompt_id", run=run).to_dicts()
        tokens = wh.sql("SELECT prompt_id, position, token FROM tokens WHERE run_id = $run "
                        "ORDER BY prompt_id, position", run=run).to_dicts()
        pattern = wh.sql("SELECT prompt_id, layer, head, query_pos, key_pos, value FROM pair_scalars "
                         "WHERE run_id = $run AND scalar = 'attn_pattern'", run=run).to_dicts()
        effect = wh.sql("SELECT prompt_id, layer, node_index AS head, sum(value) AS value FROM "
                        "node_scalars WHERE run_id = $run AND scalar = 'attn_direct_effect' "
                        "GROUP BY ALL", run=run).to_dicts()
        circuits = [find_circuit(wh, run, p["prompt_id"], "influence") for p in prompts]

    order = {i: r["meta"]["order"] for i, r in enumerate(rows)}
    # positions of IO, S1, S2 and the final token, from the stored tokens
    where: dict[int, dict[str, int]] = {}
    for i, r in enumerate(rows):
        toks = [t for t in tokens if t["prompt_id"] == i]
        s_pos = [t["position"] for t in toks if t["token"] == r["distractor"]]
        io_pos = [t["position"] for t in toks if t["token"] == r["target"]]
        where[i] = {"IO": io_pos[0], "S1": s_pos[0], "S2": s_pos[1], "S2+1": s_pos[1] + 1,
                    "END": toks[-1]["position"]}
    att: dict[tuple, float] = {}
    for p in pattern:
        att[(p["prompt_id"], p["layer"], p["head"], p["query_pos"], p["key_pos"])] = p["value"]
    eff = {(e["prompt_id"], e["layer"], e["head"]): e["value"] for e in effect}

    in_circuit: Counter = Counter()
    edge_count: Counter = Counter()
    for c in circuits:
        for label in set(c.nodes["label"].to_list()):
            in_circuit[label] += 1
        for e in c.edges.iter_rows(named=True):
            edge_count[(e["up_label"], e["down_label"], e["down_input"])] += 1
    n = len(rows)
    heads = sorted({lab for lab in in_circuit if re.fullmatch(r"L\d+H\d+", lab)},
                   key=lambda lab: (-in_circuit[lab], parse_head(lab)))
    per_head = {}
    for lab in heads:
        L, h = parse_head(lab)
        stats = {"in_circuits": in_circuit[lab] / n}
        for o in ("ABB", "BAB"):
            ids = [i for i in range(n) if order[i] == o]
            for name in ("IO", "S1", "S2", "S2+1"):
                stats[f"{o}_end_to_{name}"] = sum(
                    att.get((i, L, h, where[i]["END"], where[i][name]), 0.0) for i in ids) / len(ids)
            stats[f"{o}_s2_to_s1"] = sum(
                att.get((i, L, h, where[i]["S2"], where[i]["S1"]), 0.0) for i in ids) / len(ids)
            stats[f"{o}_direct_effect"] = sum(eff.get((i, L, h), 0.0) for i in ids) / len(ids)
        per_head[lab] = stats
    by_order = {}
    for o in ("ABB", "BAB"):
        ps = [p for p in prompts if order[p["prompt_id"]] == o]
        by_order[o] = {"n": len(ps),
                       "clean": sum(p["metric"] for p in ps) / len(ps),
                       "corrupt": sum(p["corrupt_metric"] for p in ps) / len(ps)}
    clean = sum(p["metric"] for p in prompts) / n
    corrupt = sum(p["corrupt_metric"] for p in prompts) / n
    return {
        "run": run, "n_prompts": n, "clean_logit_diff": clean, "corrupt_logit_diff": corrupt,
        "mean_change": clean - corrupt, "by_order": by_order,
        "circuit_heads": [lab for lab in heads if in_circuit[lab] / n >= CIRCUIT_SHARE],
        "nodes": {lab: cnt / n for lab, cnt in in_circuit.most_common()},
        "heads": per_head,
        "edges": [{"up": u, "down": d, "input": i, "share": cnt / n}
                  for (u, d, i), cnt in edge_count.most_common() if cnt / n >= 0.5],
        "prompt0_circuit": circuits[0].edges.select("up_label", "down_label", "down_input",
                                                    "value").to_dicts(),
    }


def induction_circuit(db: Path) -> dict:
    """Induction and previous-token heads (saved queries over stored attention patterns) and the
    ranked edges into the induction head's key input (EAP, summed |value| over the prompts)."""
    from actwh.queries.loader import Queries
    from actwh.runner import EdgeOptions, PopulateOptions, populate
    from actwh.warehouse import Warehouse

    q = Queries()
    ind = populate(db, PopulateOptions(prompts=str(PROMPTS / "induction.jsonl"),
                                       scalars=("attn_pattern",), target="logprob", select="dense"), progress=False).run_id
    edges = populate(db, PopulateOptions(prompts=str(PROMPTS / "induction.jsonl"),
                                         scalars=("attn_pattern",), target="logprob",
                                         select="top-k:1:attn_act_times_grad",
                                         edges=EdgeOptions(select="dense")), progress=False).run_id
    with Warehouse(db) as wh:
        induction = q["induction_heads"](wh, run=ind, k=5).to_dicts()
        previous = q["previous_token_heads"](wh, run=ind, k=12).to_dicts()
        top = induction[0]
        into_k = wh.sql(
            "SELECT up_layer, up_type::VARCHAR AS up_type, up_index, sum(abs(value)) AS strength "
            "FROM edges WHERE run_id = $run AND down_type = 'attn_head' AND down_layer = $layer "
            "AND down_index = $head AND down_input = 'k' GROUP BY ALL "
            "ORDER BY strength DESC, up_layer, up_index", run=edges, layer=top["layer"],
            head=top["head"]).to_dicts()
    from actwh.queries.circuit import label

    ranked = [{"rank": i + 1, "node": label(e["up_layer"], e["up_type"], e["up_index"], None),
               "strength": e["strength"]} for i, e in enumerate(into_k)]
    rank_of = {r["node"]: r["rank"] for r in ranked}
    below = [h for h in previous if h["layer"] < top["layer"]]
    prev = max(below, key=lambda h: h["previous_token_score"]) if below else None
    return {"induction": induction, "previous_token": previous[:6], "into_k": ranked,
            "induction_head": top["node_label"],
            "previous_token_head": prev["node_label"] if prev else None,
            "previous_token_score": prev["previous_token_score"] if prev else None,
            "previous_token_edge_rank": rank_of.get(prev["node_label"]) if prev else None}


README = WEIGHTS.parents[2] / "README.md"


def readme_commands(marker: str) -> list[list[str]]:
    """The `actwh` command lines of the README's bash block that contains `marker`, split as a
    shell would, with `$(actwh examples NAME)` expanded to the shipped file."""
    import shlex

    for block in re.findall(r"```bash\n(.*?)```", README.read_text(), re.S):
        if marker in block:
            lines = [re.sub(r"\s+#.*$", "", line) for line in block.splitlines()]
            return [[str(PROMPTS / f"{a[len('$(actwh examples '):-1]}.jsonl")
                     if a.startswith("$(actwh examples ") else a for a in shlex.split(line)[1:]]
                    for line in lines if line.startswith("actwh ")]
    raise ValueError(f"no README bash block contains {marker!r}")


def run_cli(args: list[str], db: Path) -> str:
    from click.testing import CliRunner

    from actwh.cli.main import cli

    r = CliRunner().invoke(cli, [*args, "--db", str(db)])
    if r.exit_code != 0:
        raise RuntimeError(f"actwh {' '.join(args)} failed: {r.output}")
    return r.output


def faithfulness(db: Path, run: int, eval_id: int | None = None) -> dict:
    """`actwh evaluate` of a run's influence circuits at the default thresholds (node 0.8, edge
    0.98), corrupted-prompt baseline (or the stored evaluation `eval_id`): per prompt the
    faithfulness (patched − corrupted) / (clean − corrupted), its mean and median over prompts,
    and the share of the mean metric difference the circuits recover, (mean patched − mean
    corrupted) / (mean clean − mean corrupted), which a prompt whose clean and corrupted metrics
    nearly agree cannot swamp."""
    from statistics import median

    from actwh.evaluate import EvalOptions, evaluate
    from actwh.warehouse import Warehouse

    if eval_id is None:
        eval_id = evaluate(db, run, EvalOptions("influence", (0.98,), "corrupt")).eval_id
    with Warehouse(db) as wh:
        rows = wh.sql("SELECT prompt_id, selection, n_edges, n_nodes, metric, faithfulness FROM "
                      "circuit_evals WHERE eval_id = $e", e=eval_id).to_dicts()
    by = {sel: [r for r in rows if r["selection"] == sel]
          for sel in ("influence:0.8/0.98", "none", "all")}
    mean = lambda rs, k: sum(r[k] for r in rs) / len(rs)  # noqa: E731
    kept = by["influence:0.8/0.98"]
    f = [r["faithfulness"] for r in kept]
    return {"faithfulness": sum(f) / len(f), "median": median(f), "min": min(f), "max": max(f),
            "recovered": (mean(kept, "metric") - mean(by["none"], "metric"))
            / (mean(by["all"], "metric") - mean(by["none"], "metric")),
            "clean": mean(by["all"], "metric"), "corrupted": mean(by["none"], "metric"),
            "patched": mean(kept, "metric"), "n_prompts": len(kept),
            "mean_edges": mean(kept, "n_edges"), "graph_edges": mean(by["all"], "n_edges"),
            "mean_nodes": mean(kept, "n_nodes")}


def method_comparison(db: Path) -> dict:
    """The README's method comparison (its bash block with `actwh query method_auc`), run as
    written on a fresh warehouse: the table `method_auc` prints, and the influence circuit's
    faithfulness at the default thresholds on the EAP run."""
    out = ""
    for args in readme_commands("actwh query method_auc"):
        text = run_cli(args, db)
        if args[:2] == ["query", "method_auc"]:
            out = text
    from actwh.warehouse import Warehouse

    with Warehouse(db) as wh:  # the README's `actwh evaluate 1`: influence at its default sizes
        eval_id = wh.sql("SELECT max(eval_id) AS e FROM circuit_evals WHERE run_id = 1 AND "
                         "method = 'influence'")["e"][0]
    return {"method_auc_table": out.rstrip("\n"),
            "influence_default": faithfulness(db, 1, eval_id)}


def head_role(s: dict) -> str:
    """What a circuit head does, in words, from its measured attention and direct effect."""
    parts = []
    io = (s["ABB_end_to_IO"] + s["BAB_end_to_IO"]) / 2
    s1 = (s["ABB_end_to_S1"] + s["BAB_end_to_S1"]) / 2
    s2 = (s["ABB_end_to_S2"] + s["BAB_end_to_S2"]) / 2
    dup = (s["ABB_s2_to_s1"] + s["BAB_s2_to_s1"]) / 2
    de = (s["ABB_direct_effect"] + s["BAB_direct_effect"]) / 2
    first = (s["ABB_end_to_IO"] + s["BAB_end_to_S1"]) / 2
    if first >= 0.4 and min(s["ABB_end_to_IO"], s["BAB_end_to_S1"]) > 2 * max(
            s["ABB_end_to_S1"], s["BAB_end_to_IO"]):
        parts.append("attends from the final position to the *first* name in both orders "
                     "(positional, not IOI)")
    elif io >= 0.4 and io > 2 * (s1 + s2):
        parts.append(f"attends from the final position to the indirect object in both orders "
                     f"({s['ABB_end_to_IO']:.2f} ABB, {s['BAB_end_to_IO']:.2f} BAB)"
                     + (" and raises its logit directly: a name mover" if de > 0.5 else "")
                     + (" and lowers it directly: a negative name mover" if de < -0.5 else ""))
    elif s1 + s2 >= 0.25 and s1 + s2 > 2 * io:
        parts.append(f"attends from the final position to the subject ({s1:.2f} to its first "
                     f"mention, {s2:.2f} to its second)"
                     + (", with a direct effect on the logit difference of "
                        f"{de:+.2f}" if abs(de) > 0.5 else
                        "; little direct effect: it moves the subject's identity to the final "
                        "position (S-inhibition-like)"))
    after_s2 = (s.get("ABB_end_to_S2+1", 0.0) + s.get("BAB_end_to_S2+1", 0.0)) / 2
    if not parts and after_s2 >= 0.4:
        parts.append("attends from the final position to the word after the subject's second "
                     f"mention (S2+1: {s['ABB_end_to_S2+1']:.2f} ABB, {s['BAB_end_to_S2+1']:.2f} "
                     "BAB), not to a name"
                     + (f", and raises the logit difference directly ({de:+.2f})" if de > 0.5 else ""))
    if dup >= 0.3:
        parts.append(f"attends from the subject's second mention to its first ({dup:.2f}): a "
                     "duplicate-token head")
    if not parts:
        parts.append(f"no IOI-specific attention (final position → IO {io:.2f}, S1 {s1:.2f}, "
                     f"S2 {s2:.2f}, S2+1 {after_s2:.2f}; S2 → S1 {dup:.2f}); direct effect {de:+.2f}")
    return "; ".join(parts)


def reproduce_args(summary: dict) -> str:
    """The training command's arguments, less where it wrote (the shipped folder is the default)."""
    args = re.sub(r"--out \S+ ?", "", summary.get("command_args", "")).strip()
    args = re.sub(r"--attn-only +(?=--|$)", "--attn-only '' ", args)  # an empty value, quoted
    if summary.get("stopped_at", summary["steps"]) < summary["steps"] and "--stop-at" not in args:
        args += f" --stop-at {summary['stopped_at']}"  # the run was cut short there
    return args


PREVIOUS_WEIGHTS_COMMIT = "2915e22"  # the default model shipped before issue 17


def supervision(summary: dict) -> str:
    """What an added attention loss made of which head in one training run ('' for none)."""
    parts = []
    if summary.get("supervised_previous_token_head"):
        parts.append(f"{summary['supervised_previous_token_head']}'s attention toward the previous "
                     "token (`--supervise-previous-token`)")
    if summary.get("supervised_induction_head"):
        parts.append(f"{summary['supervised_induction_head']}'s toward the token after the "
                     "previous occurrence of the current one (`--supervise-induction`)")
    restarted = (f", after restarting {summary['reinitialised_key']}'s key weights "
                 "(`--reinit-key`)" if summary.get("reinitialised_key") else "")
    if not parts:
        return restarted
    return (f", with an added loss (weight {summary.get('supervise_weight', 1.0)}) pulling "
            + " and ".join(parts) + restarted)


def supervised_note(summary: dict) -> str:
    """The card's warning that some heads' attention patterns were trained to a given pattern."""
    prev = sorted({s["supervised_previous_token_head"] for s in lineage(summary)
                   if s.get("supervised_previous_token_head")})
    ind = sorted({s["supervised_induction_head"] for s in lineage(summary)
                  if s.get("supervised_induction_head")})
    if not prev and not ind:
        return ""
    told = [f"{', '.join(prev)} toward the previous token"] if prev else []
    told += [f"{', '.join(ind)} toward the token after the previous occurrence of the current one"
             ] if ind else []
    return ("**Some attention patterns were supervised, not discovered**: during training an added "
            f"loss pulled the attention of {' and of '.join(told)} (see Training). Where those heads "
            "attend is therefore by construction, and the added loss also trained the weights "
            "those patterns are computed from (for an induction head's key, the earlier heads it "
            "reads). What the heads copy, and how the rest of the model uses it, was learned from "
            "the language-model loss.")


def lineage(summary: dict) -> list[dict]:
    """The runs that made the shipped weights, first to last (each continued from the one before)."""
    chain, s = [], summary
    while s is not None:
        chain.append(s)
        s = s.get("init_summary")
    return chain[::-1]


def training_paragraph(summary: dict) -> str:
    def common(s: dict) -> str:
        return (f"seed {s['seed']}, batch {s['batch']} × {s['seq']} tokens, AdamW "
                f"lr {s.get('lr', 3e-3)}, {s['threads']} CPU thread, a budget of "
                f"{s['steps']} steps (the learning rate drops to 30% after 85% of them); best "
                f"checkpoint (`checkpoint_score` in train.py) at step {s['step']} "
                f"({s['minutes']} minutes of wall clock on a shared 2-core machine)")

    chain = lineage(summary)
    if summary.get("init") and len(chain) == 1:
        return (
            "Continued from the previous default model (commit "
            f"{PREVIOUS_WEIGHTS_COMMIT}: the same architecture and tokenizer, trained 8,000 steps "
            "on a corpus whose IOI sentences always named the indirect object first, so it had "
            "learned to say the first name, and whose induction head was already in place) on "
            f"this corpus's full mix, without the curriculum: {common(summary)}. Reproducing: `git "
            f"archive {PREVIOUS_WEIGHTS_COMMIT} compute/default_model/weights | tar -x -C old`, "
            "then `python -m actwh.compute.default_model.train "
            f"{reproduce_args(summary).replace(str(summary['init']), 'old/compute/default_model/weights')}`.")
    if len(chain) == 1:
        return (f"From scratch: {common(summary)}{supervision(summary)}. Curriculum (`STAGES` in "
                "train.py): drills (`x r x` skip triples and repeated spans) on 64-word alphabets, "
                "then on 256-word alphabets with induction spans, each until its probe passes 0.8 "
                "or its step cap, then the full mix. Reproducing: `python -m "
                f"actwh.compute.default_model.train {reproduce_args(summary)}`.")
    runs, commands = [], []
    for k, s in enumerate(chain, 1):
        how = ("from scratch, with the curriculum (`STAGES` in train.py: drills on 64-word, then "
               "256-word alphabets, each until its probe passes 0.8 or its step cap, then the "
               "full mix)" if k == 1 else f"continued from run {k - 1}'s best checkpoint on the "
               "full mix")
        runs.append(f"run {k}, {how}: {common(s)}{supervision(s)}")
        args = reproduce_args(s) if s is summary else re.sub(
            r"--out \S+ ?", "", s.get("command_args", "")).strip()
        if s is not summary and s["step"] < s["steps"] and "--stop-at" not in args:
            args += f" --stop-at {s['step']}"  # its best checkpoint; the run went on past it
        if k > 1:
            args = args.replace(str(s["init"]), f"run{k - 1}")
        commands.append("python -m actwh.compute.default_model.train "
                        + (f"--out run{k} " if s is not summary else "") + args)
    return (f"Trained in {len(chain)} runs, each continuing from the last: " + "; ".join(runs)
            + ". Reproducing: " + ", then ".join(f"`{c}`" for c in commands)
            + " (the last writes the shipped folder). The curve below is the last run's.")


def render(acc: dict, tour: dict, ind: dict, summary: dict, curve: list[dict], config: dict,
           methods: dict) -> str:
    attn_only = summary.get("attn_only_layers", [])
    keys = [("ioi_abb_held_out_pairs", "IOI, ABB (answer first), held-out name pairs"),
            ("ioi_bab_held_out_pairs", "IOI, BAB (answer second), held-out name pairs"),
            ("ioi_abb_unseen_names", "IOI, ABB, names never used in IOI training"),
            ("ioi_bab_unseen_names", "IOI, BAB, names never used in IOI training"),
            ("induction_span10", "induction, second copy of a 10-word span from the whole vocabulary"),
            ("induction_span25", "induction, 25-word spans"),
            ("copy_alphabet64", "copy drills (64-word alphabet)")]
    heads = tour["heads"]
    lines = [
        "# actwh default model", "",
        "A small GPT-2 (transformers `GPT2LMHeadModel`) trained by `python -m "
        "actwh.compute.default_model.train` on text generated by `corpus.py`, so the tasks it "
        "learned are known. It ships inside the package and is what `actwh` uses without "
        "`--model`. Every figure below is measured on the shipped folder by `python -m "
        "actwh.model_card`, which wrote this file.", "",
        "## Architecture",
        f"{config['n_layer']} layers, {config['n_head']} heads, d_model {config['n_embd']}, "
        f"context {config['n_positions']}, vocabulary {config['vocab_size']} (a word-level "
        "tokenizer trained with `tokenizers` on the corpus; every prompt starts with "
        f"`<|endoftext|>`), tied embeddings, {summary['n_params']:,} parameters"
        + (f". Layer {', '.join(map(str, attn_only))}'s MLP is zero and was frozen at zero "
           "(an attention-only layer in GPT-2's format: previous-token information can only be "
           "moved by its heads)" if attn_only else "")
        + ("; position embeddings started at sinusoids" if summary.get("sinusoidal_init")
           and not summary.get("planted_previous_token_head") else "")
        + ".", "",
        *([f"**{summary['planted_previous_token_head']} was built as a previous-token head, not "
           "learned**: before training, the position embeddings were set to 16 sinusoid pairs in "
           "the first 32 residual dimensions and this head's query and key weights to the rotation "
           "that makes position p attend to p - 1 (`plant_previous_token_head` in train.py)"
           + ("; its query and key weights stayed fixed during training (`freeze_query_key`), "
              "while its value and output weights, the position embeddings and every other "
              "weight trained. Everything else in the circuits below was learned."
              if summary.get("frozen_query_key") else
              "; they then trained freely with every other weight."), ""]
          if summary.get("planted_previous_token_head") else []),
        *([supervised_note(summary), ""] if supervised_note(summary) else []),
        "## Tasks in the corpus",
        "- induction: spans of 4-20 words drawn uniformly from the whole vocabulary, repeated later;",
        "- copy drills: a span repeated 2-4 times, from a small alphabet, then any word; skip drills: "
        "triples `x r x` (the third word is the one before the previous word);",
        "- indirect-object identification in the style of Wang et al. 2022: 9 templates, each in "
        "both name orders in equal measure (ABB: `When Mary and John went to the store , John "
        "gave a drink to` → Mary; BAB: `When John and Mary ...` → Mary), 10% of name pairs held "
        "out, 30 names never used in IOI (they occur only in filler sentences and random spans);",
        "- successor sequences (days, months, counting) and filler sentences.", "",
        "## Training", training_paragraph(summary),        "",
        "| step | minutes | stage | IOI ABB pairs | IOI BAB pairs | IOI ABB unseen | IOI BAB unseen "
        "| induction span 10 | previous-token head |",
        "|---|---|---|---|---|---|---|---|---|",
        *[f"| {c['step']} | {c['minutes']} | {c['stage']} | {c['ioi_abb_held_out_pairs']:.3f} | "
          f"{c['ioi_bab_held_out_pairs']:.3f} | {c['ioi_abb_unseen_names']:.3f} | "
          f"{c['ioi_bab_unseen_names']:.3f} | {c['induction_span10']:.3f} | "
          f"{c['previous_token_head']} {c['previous_token_score']:.2f} |"
          for c in (lambda shown: shown + [c for c in curve[-1:] if c not in shown])(
              curve[::max(1, len(curve) // 15)])], "",
        "## Held-out accuracy (top-1 next token, plain transformers, fresh seeded sample of 400 each)",
        *[f"- {text}: **{acc[k]:.3f}**" for k, text in keys], "",
        "## The IOI circuit",
        f"The README's IOI tour on all {tour['n_prompts']} prompts of `prompts/ioi.jsonl` "
        "(held-out name pairs, half in each order, `meta.order`): `populate --edges "
        f"--edges-baseline corrupt --ig-steps {TOUR_IG_STEPS}` (EAP-IG from the corrupted prompt, "
        "in which the subject's second mention is replaced by the indirect object, so the "
        "distractor becomes the right answer), then `circuit --method influence` on each prompt.", "",
        f"- mean logit difference (target − distractor), clean: **{tour['clean_logit_diff']:.2f}**; "
        f"corrupted: **{tour['corrupt_logit_diff']:.2f}**; mean change **"
        f"{tour['mean_change']:.2f}** ({tour['mean_change'] / tour['clean_logit_diff']:.2f} × the "
        "clean value)",
        *[f"- {o}: clean {v['clean']:.2f}, corrupted {v['corrupt']:.2f} ({v['n']} prompts)"
          for o, v in tour["by_order"].items()], "",
        f"Heads in at least {CIRCUIT_SHARE:.0%} of the prompts' influence circuits (the IOI heads): "
        f"**{', '.join(tour['circuit_heads']) or 'none'}**.", "",
        "| head | in circuits | final pos → IO (ABB/BAB) | → S1 | → S2 | → S2+1 | S2 → S1 | direct effect (ABB/BAB) |",
        "|---|---|---|---|---|---|---|---|",
        *[f"| {lab} | {s['in_circuits']:.0%} | {s['ABB_end_to_IO']:.2f}/{s['BAB_end_to_IO']:.2f} | "
          f"{s['ABB_end_to_S1']:.2f}/{s['BAB_end_to_S1']:.2f} | "
          f"{s['ABB_end_to_S2']:.2f}/{s['BAB_end_to_S2']:.2f} | "
          f"{s['ABB_end_to_S2+1']:.2f}/{s['BAB_end_to_S2+1']:.2f} | "
          f"{s['ABB_s2_to_s1']:.2f}/{s['BAB_s2_to_s1']:.2f} | "
          f"{s['ABB_direct_effect']:+.2f}/{s['BAB_direct_effect']:+.2f} |"
          for lab, s in heads.items() if s["in_circuits"] >= 0.25], "",
        "Edges kept in at least half of the prompts' circuits:", "",
        *[f"- {e['up']} → {e['down']}{'.' + e['input'] if e['input'] else ''} ({e['share']:.0%})"
          for e in tour["edges"]], "",
        "What the heads do (measured, per head):", "",
        *[f"- **{lab}**: {head_role(heads[lab])}"
          + (f"; it is the induction circuit's previous-token head (score "
             f"{ind['previous_token_score']:.2f}, next section)" if lab == ind["previous_token_head"]
             else "") + "." for lab in tour["circuit_heads"]], "",
        *story(tour), "",
        *([f"{ind['induction_head']} is also the induction head of the next section: one head "
           "serves both tasks.", ""] if ind["induction_head"] in tour["circuit_heads"] else []),
        "## The induction circuit",
        "From `populate` over `prompts/induction.jsonl` (dense attention patterns) and the saved "
        "queries `induction_heads` and `previous_token_heads`; edges from `populate --edges` "
        "(EAP, target: log-probability of the next token of the second copy), summed |value| over "
        "the prompts.", "",
        "| induction head | score |", "|---|---|",
        *[f"| {h['node_label']} | {h['induction_score']:.3f} |" for h in ind["induction"]], "",
        "| previous-token head | score |", "|---|---|",
        *[f"| {h['node_label']} | {h['previous_token_score']:.3f} |" for h in ind["previous_token"]], "",
        f"Edges into {ind['induction_head']}'s key input, ranked:", "",
        "| rank | from | Σ|edge| |", "|---|---|---|",
        *[f"| {r['rank']} | {r['node']} | {r['strength']:.3f} |" for r in ind["into_k"]], "",
        f"Induction head: **{ind['induction_head']}**. Previous-token head: "
        f"**{ind['previous_token_head']}** (the best previous-token score below the induction "
        f"head, {ind['previous_token_score']:.3f}); its edge into {ind['induction_head']}'s key "
        f"ranks **{ind['previous_token_edge_rank']}** of {len(ind['into_k'])}.", "",
        "## Faithfulness",
        "Measured with `actwh evaluate` (the model run once per circuit with every component-graph "
        "edge outside it patched, per downstream input, to its value on the corrupted prompt): "
        "faithfulness = (patched − corrupted) / (clean − corrupted) per prompt, averaged over the "
        "prompts, for each prompt's influence circuit at the default thresholds (node 0.8, edge "
        "0.98).", "",
        "| circuit | edges kept | clean | corrupted | patched | recovered | faithfulness mean / median (range) |",
        "|---|---|---|---|---|---|---|",
        *[f"| {name} | {f['mean_edges']:.1f} of {f['graph_edges']:.0f} | {f['clean']:.2f} | "
          f"{f['corrupted']:.2f} | {f['patched']:.2f} | **{f['recovered']:.3f}** | "
          f"{f['faithfulness']:.2f} / {f['median']:.2f} ({f['min']:.2f} to {f['max']:.2f}) |"
          for name, f in [("IOI, the tour's circuits (EAP-IG, 5 steps)", tour["faithfulness"]),
                          ("IOI, EAP over the dense graph (the README's method comparison)",
                           methods["influence_default"]),
                          ("induction (EAP from the corrupted prompts)", ind["faithfulness"])]],
        "",
        "Clean, corrupted and patched are mean metrics over the prompts (IOI: logit difference; "
        "induction: log-probability of the next token of the second copy; the corrupted "
        "induction prompts shuffle the first copy); recovered = (patched − corrupted) / (clean − "
        "corrupted) of those means; faithfulness is the same ratio per prompt, which a prompt whose "
        "clean and corrupted metrics nearly agree can push far outside [0, 1].", "",
        "The README's method comparison (EAP, EAP-IG with 5 steps, influence pruning on the IOI "
        "prompts; `actwh query method_auc`):", "",
        "```", methods["method_auc_table"], "```", "",
    ]
    return "\n".join(lines)


def roles(s: dict) -> set[str]:
    """The roles `head_role` describes, as tags."""
    text = head_role(s)
    return {tag for tag, words in [("name mover", "a name mover"),
                                   ("negative name mover", "negative name mover"),
                                   ("subject", "to the subject"),
                                   ("duplicate", "duplicate-token"),
                                   ("positional", "positional")] if words in text}


def story(tour: dict) -> list[str]:
    """Whether the circuit has Wang et al.'s shape (duplicate-token head → a head at the final
    position that reads the subject → the name mover's query), read off the measured roles and
    the edges kept in at least half of the prompts' circuits."""
    heads = tour["circuit_heads"]
    tags = {h: roles(tour["heads"][h]) for h in heads}
    edges = {(e["up"], e["down"], e["input"]) for e in tour["edges"]}
    movers = [h for h in heads if "name mover" in tags[h]]
    subject = [h for h in heads if "subject" in tags[h]]
    dup = [h for h in heads if "duplicate" in tags[h]]
    chain = [(d, s, m) for d in dup for s in subject for m in movers
             if any((d, s, i) in edges for i in ("q", "k", "v")) and (s, m, "q") in edges]
    if any("positional" in tags[h] for h in heads):
        return ["A head in the circuit attends to the first name whatever the order: part of "
                "the answer comes from position, not from which name is repeated."]
    if chain:
        d, s_, m = chain[0]
        return [f"Reading: the circuit has the shape of Wang et al.'s IOI circuit in miniature. "
                f"{d} finds the repeated name (from the subject's second mention it attends to "
                f"the first); {s_}, reading {d}'s output, attends from the final position to the "
                f"subject's second mention and writes into {m}'s query (the edge {s_} → {m}.q is "
                f"in at least half of the prompts' circuits), where the S-inhibition heads of "
                f"the paper act; {m} attends to the indirect object and raises the logit "
                "difference directly: the name mover. Wang et al.'s other classes (backup and negative name "
                "movers, induction heads feeding S-inhibition) do not appear at this threshold."]
    return [f"Reading: name movers {', '.join(movers) or 'none'}; heads reading the subject "
            f"{', '.join(subject) or 'none'}; duplicate-token heads {', '.join(dup) or 'none'}. "
            "The edges kept do not connect them as Wang et al.'s circuit does (duplicate-token → "
            "S-inhibition → name-mover query)."]


def induction_faithfulness(db: Path) -> dict:
    """The induction circuit checked by patching: EAP edges from the corrupted prompts (the
    first copy shuffled, so the second copy no longer repeats it) on `prompts/induction.jsonl`,
    then `faithfulness` of each prompt's influence circuit."""
    from actwh.runner import EdgeOptions, PopulateOptions, populate

    run = populate(db, PopulateOptions(prompts=str(PROMPTS / "induction.jsonl"), target="logprob",
                                       edges=EdgeOptions(baseline="corrupt", select="dense")),
                   progress=False).run_id
    return faithfulness(db, run)


def main() -> None:
    acc = measure_accuracy()
    with tempfile.TemporaryDirectory() as tmp:
        tour = ioi_tour(Path(tmp) / "ioi.duckdb")
        tour["faithfulness"] = faithfulness(Path(tmp) / "ioi.duckdb", tour["run"])
        ind = induction_circuit(Path(tmp) / "induction.duckdb")
        ind["faithfulness"] = induction_faithfulness(Path(tmp) / "induction-corrupt.duckdb")
        methods = method_comparison(Path(tmp) / "methods.duckdb")
    summary = json.loads((WEIGHTS / "train_summary.json").read_text())
    curve = [json.loads(line) for line in (WEIGHTS / "train_log.jsonl").read_text().splitlines()]
    summary["stopped_at"] = curve[-1]["step"]
    config = json.loads((WEIGHTS / "config.json").read_text())
    CARD.write_text(render(acc, tour, ind, summary, curve, config, methods))
    CARD_JSON.write_text(json.dumps({"accuracy": acc, "ioi": tour, "induction": ind,
                                     "methods": methods}, indent=1, default=str))
    print(CARD.read_text())


if __name__ == "__main__":
    main()
