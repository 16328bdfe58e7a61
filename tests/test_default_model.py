"""The shipped default model does what its card claims: IOI in both name orders on held-out names,
shipped corruptions that move the logit difference, a previous-token head feeding the induction
head's key, whole-vocabulary induction, and the README's IOI tour finding the card's IOI heads."""

from __future__ import annotations

import json
import random
import re
import shlex

import pytest
import torch

from actwh.compute.default_model import PROMPTS, WEIGHTS

CARD = WEIGHTS / "MODEL_CARD.md"
README = WEIGHTS.parents[2] / "README.md"


def card_heads():
    text = CARD.read_text()
    induction = re.search(r"Induction head: \*\*(L\d+H\d+)\*\*", text).group(1)
    previous = re.search(r"Previous-token head: \*\*(L\d+H\d+)\*\*", text).group(1)
    ioi = re.search(r"\(the IOI heads\): \*\*([^*]+)\*\*", text).group(1).split(", ")
    return induction, previous, ioi


@pytest.fixture(scope="module")
def hf():
    """The shipped folder, loaded by plain transformers (no actwh code)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(WEIGHTS, attn_implementation="eager").eval()
    return model, AutoTokenizer.from_pretrained(WEIGHTS)


def last_logits(hf, texts: list[str]) -> torch.Tensor:
    """Next-token logits after each text, batched with right padding and an attention mask."""
    model, tok = hf
    enc = [tok(t).input_ids for t in texts]
    width = max(map(len, enc))
    ids = torch.tensor([e + [tok.pad_token_id] * (width - len(e)) for e in enc])
    mask = torch.tensor([[1] * len(e) + [0] * (width - len(e)) for e in enc])
    with torch.no_grad():
        logits = model(ids, attention_mask=mask).logits
    return logits[torch.arange(len(enc)), torch.tensor([len(e) - 1 for e in enc])]


# Sentences written here, not by corpus.py: the test's own wording of Wang et al.'s templates
# (the first two are trained templates, the third a trained template with another object).
SENTENCES = [
    "When {a} and {b} went to the {place} , {s} gave a {obj} to",
    "After {a} and {b} went to the {place} , {s} gave a {obj} to",
    "When {a} and {b} met at the {place} , {s} handed the {obj} to",
]


def ioi_sentences(names_or_pairs, order: str, n: int, seed: int):
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        pool = rng.choice(names_or_pairs) if isinstance(names_or_pairs[0], tuple) else names_or_pairs
        io, s = rng.sample(list(pool), 2)
        a, b = (io, s) if order == "ABB" else (s, io)
        text = rng.choice(SENTENCES).format(a=a, b=b, s=s, place=rng.choice(["store", "park", "zoo"]),
                                            obj=rng.choice(["drink", "book", "kite"]))
        out.append((text, io, s))
    return out


# Issue 17's first acceptance point.
@pytest.mark.parametrize("order,names", [
    ("ABB", "unseen_names"), ("BAB", "unseen_names"),
    ("ABB", "held_out_pairs"), ("BAB", "held_out_pairs")])
def test_ioi_in_each_order_on_held_out_names(hf, order, names):
    from actwh.compute.default_model.corpus import NameSplit

    split = NameSplit.make(0)  # the split the shipped model was trained with
    pool = list(split.unseen_names) if names == "unseen_names" else sorted(split.held_out_pairs)
    rows = ioi_sentences(pool, order, 120, seed=len(order + names) + 7 * (order == "ABB"))
    tok = hf[1]
    # the answer is the first name in ABB, the second in BAB: position alone cannot score both
    assert all(t.split().index(io) < t.split().index(s) for t, io, s in rows) == (order == "ABB")
    pred = last_logits(hf, [t for t, _, _ in rows]).argmax(-1)
    answer = torch.tensor([tok.convert_tokens_to_ids(io) for _, io, _ in rows])
    acc = (pred == answer).float().mean().item()
    print(order, names, acc)
    assert acc >= 0.95


def test_shipped_ioi_prompts_cover_both_orders_and_their_corruptions_flip_the_answer(hf):
    rows = [json.loads(line) for line in (PROMPTS / "ioi.jsonl").read_text().splitlines()]
    orders = [r["meta"]["order"] for r in rows]
    assert orders.count("ABB") == orders.count("BAB") == len(rows) // 2
    for r in rows:
        words, bad = r["text"].split(), r["corrupt"].split()
        first_io, first_s = words.index(r["target"]), words.index(r["distractor"])
        assert (first_io < first_s) == (r["meta"]["order"] == "ABB")
        assert words.count(r["distractor"]) == 2 and words.count(r["target"]) == 1
        # one word differs: the subject's second mention, now the indirect object's name
        diff = [i for i, (x, y) in enumerate(zip(words, bad)) if x != y]
        assert len(words) == len(bad) and len(diff) == 1
        assert words[diff[0]] == r["distractor"] and bad[diff[0]] == r["target"]
    tok = hf[1]
    t = torch.tensor([tok.convert_tokens_to_ids(r["target"]) for r in rows])
    d = torch.tensor([tok.convert_tokens_to_ids(r["distractor"]) for r in rows])
    idx = torch.arange(len(rows))
    clean = last_logits(hf, [r["text"] for r in rows])
    bad = last_logits(hf, [r["corrupt"] for r in rows])
    ld_clean = clean[idx, t] - clean[idx, d]
    ld_bad = bad[idx, t] - bad[idx, d]
    change = (ld_clean - ld_bad).mean().item()
    print(ld_clean.mean().item(), ld_bad.mean().item())
    assert ld_clean.mean() > 0
    assert change >= 0.5 * ld_clean.mean().item()
    # the card's figure (measured through actwh's populate) is what plain transformers gives
    stated = re.search(r"mean change \*\*(-?[\d.]+)\*\*", CARD.read_text()).group(1)
    assert abs(float(stated) - change) <= 0.01 + 0.001 * abs(change)


def test_whole_vocabulary_induction(hf):
    model, tok = hf
    vocab = sorted(i for t, i in tok.get_vocab().items() if not t.startswith("<"))
    g = torch.Generator().manual_seed(11)
    span = torch.tensor(vocab)[torch.randint(len(vocab), (100, 12), generator=g)]
    ids = torch.cat([torch.full((100, 1), tok.bos_token_id), span, span], 1)
    with torch.no_grad():
        pred = model(ids).logits.argmax(-1)
    # positions 13 .. 23 see the second copy's tokens 1..11 and predict tokens 2..12
    acc = (pred[:, 13:24] == ids[:, 14:25]).float().mean().item()
    print(acc)
    assert acc >= 0.9


def test_evaluation_does_not_depend_on_the_vocabulary_dict_order(hf):
    # A tokenizer's get_vocab() comes back in a different order in every process; the training
    # curriculum and the card's accuracies rest on this evaluation, so it must not care.
    from actwh.compute.default_model.corpus import NameSplit
    from actwh.compute.default_model.train import evaluate

    model, tok = hf
    vocab = tok.get_vocab()
    shuffled = dict(sorted(vocab.items(), key=lambda kv: hash((kv[0], "order"))))
    assert list(shuffled) != list(vocab)
    split = NameSplit.make(0)
    assert evaluate(model, vocab, split, seed=5, n=40) == evaluate(model, shuffled, split, seed=5, n=40)


def test_loads_through_our_loader_and_transformers_with_equal_logits(hf):
    from actwh.compute.loading import load_model

    ours = load_model(None, device="cpu")
    text = json.loads((PROMPTS / "ioi.jsonl").read_text().splitlines()[1])["text"]
    ids = torch.tensor([ours.tokenizer(text).input_ids])
    with torch.no_grad():
        assert (ours.model(ids) - hf[0](ids).logits).abs().max() <= 1e-4
    assert ours.info.arch == "gpt2"


def test_weights_fit_in_the_package():
    assert sum(f.stat().st_size for f in WEIGHTS.iterdir()) <= 20 * 2**20


def head_scores_from_patterns():
    """Induction and previous-token scores of every head, from actwh's hooked model on random
    whole-vocabulary spans repeated once."""
    from actwh.compute.loading import load_model

    loaded = load_model(None, device="cpu")
    model, cfg = loaded.model, loaded.model.cfg
    vocab = [i for t, i in loaded.tokenizer.get_vocab().items() if not t.startswith("<")]
    g = torch.Generator().manual_seed(5)
    span = torch.tensor(vocab)[torch.randint(len(vocab), (16, 12), generator=g)]
    bos = torch.full((16, 1), loaded.tokenizer.bos_token_id)
    tokens = torch.cat([bos, span, span], 1)
    names = [f"blocks.{L}.attn.hook_pattern" for L in range(cfg.n_layers)]
    pat = model.run_with_cache(tokens, names).acts
    n = span.shape[1]
    q = torch.arange(n + 1, 2 * n + 1)  # second copy: token at q repeats the one at q - n
    induction = {f"L{L}H{h}": pat[names[L]][:, h, q, q - n + 1].mean().item()
                 for L in range(cfg.n_layers) for h in range(cfg.n_heads)}
    qq = torch.arange(2, 2 * n + 1)  # every token after the first real one
    previous = {f"L{L}H{h}": pat[names[L]][:, h, qq, qq - 1].mean().item()
                for L in range(cfg.n_layers) for h in range(cfg.n_heads)}
    return induction, previous


def test_attention_patterns_alone_find_the_card_heads():
    induction, previous = head_scores_from_patterns()
    card_induction, card_previous, _ = card_heads()
    assert induction[card_induction] >= 0.5
    assert induction[card_induction] == max(induction.values())
    # the card's previous-token head is the best one below the induction head, so it can feed
    # its key
    layer = lambda label: int(re.findall(r"\d+", label)[0])  # noqa: E731
    below = {h: v for h, v in previous.items() if layer(h) < layer(card_induction)}
    assert card_previous == max(below, key=below.get)


# Issue 17's third acceptance point.
def test_previous_token_head_is_crisp():
    _, previous = head_scores_from_patterns()
    _, card_previous, _ = card_heads()
    assert previous[card_previous] >= 0.7, previous


def test_saved_queries_name_the_card_heads(tmp_path):
    from actwh.queries.loader import Queries
    from actwh.runner import PopulateOptions, populate
    from actwh.warehouse import Warehouse

    db = tmp_path / "wh.duckdb"
    run = populate(db, PopulateOptions(prompts=str(PROMPTS / "induction.jsonl"),
                                       scalars=("attn_pattern",), target="logprob", select="dense"), progress=False).run_id
    induction, previous, _ = card_heads()
    with Warehouse(db) as wh:
        top = Queries()["induction_heads"](wh, run=run, k=3)
        prev = Queries()["previous_token_heads"](wh, run=run, k=20).to_dicts()
    assert top["node_label"][0] == induction
    score = {r["node_label"]: r["previous_token_score"] for r in prev}
    stated = re.search(r"\(the best previous-token score below the induction head, ([\d.]+)\)",
                       CARD.read_text()).group(1)
    assert abs(score[previous] - float(stated)) <= 1e-3


def test_saved_query_scores_the_previous_token_head_above_threshold(tmp_path):
    from actwh.queries.loader import Queries
    from actwh.runner import PopulateOptions, populate
    from actwh.warehouse import Warehouse

    db = tmp_path / "wh.duckdb"
    run = populate(db, PopulateOptions(prompts=str(PROMPTS / "induction.jsonl"),
                                       scalars=("attn_pattern",), target="logprob", select="dense"), progress=False).run_id
    _, previous, _ = card_heads()
    with Warehouse(db) as wh:
        prev = Queries()["previous_token_heads"](wh, run=run, k=20).to_dicts()
    assert {r["node_label"]: r["previous_token_score"] for r in prev}[previous] >= 0.7


def test_card_states_the_previous_token_heads_edge_rank(tmp_path):
    previous_token_edge_rank(tmp_path)


def test_previous_token_head_feeds_the_induction_heads_key(tmp_path):
    """On repeated spans, the previous-token head's edge into the induction head's k input ranks
    in the top 3 of that input's in-edges."""
    assert previous_token_edge_rank(tmp_path) <= 3


def previous_token_edge_rank(tmp_path) -> int:
    """The rank of the card's previous-token head among the edges into the card's induction
    head's k input (EAP over the shipped induction prompts), checked against the card."""
    from actwh.runner import EdgeOptions, PopulateOptions, populate
    from actwh.warehouse import Warehouse

    induction, previous, _ = card_heads()
    L_i, h_i = map(int, re.findall(r"\d+", induction))
    L_p, h_p = map(int, re.findall(r"\d+", previous))
    db = tmp_path / "wh.duckdb"
    run = populate(db, PopulateOptions(prompts=str(PROMPTS / "induction.jsonl"), scalars=("attn_pattern",),
                                       target="logprob", select="top-k:1:attn_act_times_grad",
                                       edges=EdgeOptions(select="dense")), progress=False).run_id
    with Warehouse(db) as wh:
        into = wh.sql(
            "SELECT up_layer, up_type::VARCHAR AS up_type, up_index, sum(abs(value)) AS strength "
            "FROM edges WHERE run_id = $run AND down_layer = $L AND down_type = 'attn_head' AND "
            "down_index = $h AND down_input = 'k' GROUP BY ALL ORDER BY strength DESC",
            run=run, L=L_i, h=h_i)
    ranked = [(r["up_layer"], r["up_type"], r["up_index"]) for r in into.iter_rows(named=True)]
    # every upstream node of the induction head's key: the embeddings, earlier heads and MLPs
    assert len(ranked) == 1 + L_i * (hf_heads() + 1)
    stated = re.search(r"key ranks \*\*(\d+)\*\*", CARD.read_text()).group(1)
    assert ranked.index((L_p, "attn_head", h_p)) + 1 == int(stated)
    return ranked.index((L_p, "attn_head", h_p)) + 1


def hf_heads() -> int:
    return json.loads((WEIGHTS / "config.json").read_text())["n_head"]


def readme_ioi_tour() -> list[list[str]]:
    """The `actwh` command lines of the README's IOI tour block, split as a shell would."""
    text = README.read_text()
    block = re.search(r"### The IOI tour\n.*?```bash\n(.*?)```", text, re.S).group(1)
    lines = [re.sub(r"\s+#.*$", "", line) for line in block.splitlines()]
    return [shlex.split(line)[1:] for line in lines if line.startswith("actwh ")]


def test_readme_ioi_tour_prints_a_circuit_with_the_card_ioi_heads(tmp_path, monkeypatch):
    from click.testing import CliRunner

    from actwh.cli.main import cli
    from actwh import model_card as card

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("ACTWH_DB", raising=False)
    commands = readme_ioi_tour()
    assert [c[0] for c in commands] == ["populate", "sql", "circuit"]
    assert commands[0][commands[0].index("--ig-steps") + 1] == str(card.TOUR_IG_STEPS)
    outputs = []
    for args in commands:
        # the shell would expand $(actwh examples ioi) to the shipped file's path
        args = [str(PROMPTS / "ioi.jsonl") if a == "$(actwh examples ioi)" else a for a in args]
        r = CliRunner().invoke(cli, args)
        assert r.exit_code == 0, (args, r.output)
        outputs.append(r.output)
    _, _, ioi_heads = card_heads()
    assert ioi_heads and ioi_heads != ["none"]
    circuit = outputs[-1]
    for head in ioi_heads:
        assert re.search(rf"\b{head}\b", circuit), (head, circuit)
    # the card's faithfulness of the tour's circuits is what `actwh evaluate` measures on them
    db = [a for a in commands[0] if a.endswith(".duckdb")][0]
    r = CliRunner().invoke(cli, ["evaluate", "1", "--sizes", "0.98", "--db", db])
    assert r.exit_code == 0, r.output
    assert_card_faithfulness(tmp_path / db, "ioi")


def assert_card_faithfulness(db, section: str) -> None:
    """The card's recovered share and mean faithfulness for `section` equal the latest
    evaluation's rows in `db`, computed here."""
    import duckdb

    with duckdb.connect(str(db), read_only=True) as con:
        m = dict(con.sql("SELECT selection, avg(metric) FROM circuit_evals WHERE eval_id = "
                         "(SELECT max(eval_id) FROM circuit_evals) GROUP BY selection").fetchall())
        f = con.sql("SELECT avg(faithfulness) FROM circuit_evals WHERE eval_id = (SELECT "
                    "max(eval_id) FROM circuit_evals) AND selection = 'influence:0.8/0.98'").fetchone()[0]
    card = json.loads((WEIGHTS / "card.json").read_text())[section]["faithfulness"]
    assert card["recovered"] == pytest.approx((m["influence:0.8/0.98"] - m["none"]) / (m["all"] - m["none"]), abs=1e-4)
    assert card["faithfulness"] == pytest.approx(f, abs=1e-4)
    stated = re.findall(r"\| \*\*(-?[\d.]+)\*\* \|", CARD.read_text())
    assert f"{card['recovered']:.3f}" in stated


def test_card_induction_faithfulness_is_what_evaluate_measures(tmp_path):
    from click.testing import CliRunner

    from actwh.cli.main import cli

    db = str(tmp_path / "ind.duckdb")
    for args in (["populate", str(PROMPTS / "induction.jsonl"), "--target", "logprob", "--edges",
                  "--edges-baseline", "corrupt", "--edges-select", "dense"],
                 ["evaluate", "1", "--sizes", "0.98"]):
        r = CliRunner().invoke(cli, [*args, "--db", db])
        assert r.exit_code == 0, r.output
    assert_card_faithfulness(db, "induction")


def readme_block(marker: str) -> str:
    for block in re.findall(r"```(?:bash)?\n(.*?)```", README.read_text(), re.S):
        if marker in block:
            return block
    raise AssertionError(f"no README block with {marker!r}")


def test_readme_method_auc_table_is_the_one_the_card_measured():
    """The README shows the table `actwh query method_auc` printed when the card ran the README's
    method-comparison commands on the shipped model (the computation is tested in
    test_evaluate)."""
    from actwh import model_card

    table = json.loads((WEIGHTS / "card.json").read_text())["methods"]["method_auc_table"]
    assert table.strip() in README.read_text()
    assert table.strip() in CARD.read_text()
    scorings = re.findall(r"┆ (EAP[-\w]* [\w-]+)\s+┆", table)
    assert sorted(scorings) == ["EAP influence", "EAP top-n", "EAP-IG top-n"]
    f = json.loads((WEIGHTS / "card.json").read_text())["methods"]["influence_default"]
    assert (f"{f['mean_edges']:.1f} of {f['graph_edges']:.0f} edges on average) recovers "
            f"{f['recovered']:.2f} of the mean logit difference") in " ".join(README.read_text().split())
    commands = model_card.readme_commands("actwh query method_auc")
    assert ["query", "method_auc"] in commands
    assert any("--ig-steps" in c and c[c.index("--ig-steps") + 1] == "5" for c in commands)


def test_quickstart_populate_with_no_arguments(tmp_path, monkeypatch):
    """The README's first command: `actwh populate` on the default model and its IOI prompts."""
    from click.testing import CliRunner

    from actwh.cli.main import cli

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("ACTWH_DB", raising=False)
    r = CliRunner().invoke(cli, ["populate"])
    assert r.exit_code == 0, r.output
    assert (tmp_path / "actwh.duckdb").exists()
    assert "node_label" in r.output and "attn_head" in r.output  # the closing table of top nodes
    import duckdb

    con = duckdb.connect(str(tmp_path / "actwh.duckdb"), read_only=True)
    types = {t for (t,) in con.execute("SELECT DISTINCT node_type::VARCHAR FROM node_scalars").fetchall()}
    con.close()
    assert {"attn_head", "mlp_neuron"} <= types  # heads and neurons both stored


def test_ioi_prompts_put_the_answer_first_or_second_in_equal_measure():
    from actwh.compute.default_model.corpus import ioi_prompt

    rng = random.Random(3)
    prompts = [ioi_prompt(rng, "Mary", "John") for _ in range(400)]
    first = [p.words.index("Mary") < p.words.index("John") for p in prompts]
    assert [p.order == "ABB" for p in prompts] == first
    assert 170 <= sum(first) <= 230  # both orders, about half each
    for p in prompts:
        assert p.words.count("John") == 2 and p.words.count("Mary") == 1
        diff = [i for i, (a, b) in enumerate(zip(p.words, p.corrupt)) if a != b]
        assert len(diff) == 1 and p.words[diff[0]] == "John" and p.corrupt[diff[0]] == "Mary"
        assert diff[0] == max(i for i, w in enumerate(p.words) if w == "John")  # the second mention


class FirstNameModel(torch.nn.Module):
    """A known answer for the evaluation: predicts the first name of its input at every position
    (the positional shortcut the first shipped model learned), and attends only to the previous
    token."""

    def __init__(self, vocab: dict[str, int], names: list[str]):
        super().__init__()
        self.n_vocab = max(vocab.values()) + 1
        self.names = torch.zeros(self.n_vocab, dtype=torch.bool)
        self.names[[vocab[n] for n in names]] = True

    def forward(self, ids, output_attentions=False):
        from types import SimpleNamespace

        b, n = ids.shape
        first = torch.where(self.names[ids], torch.arange(n), n).min(-1).values.clamp(max=n - 1)
        logits = torch.zeros(b, n, self.n_vocab)
        logits[torch.arange(b), :, ids[torch.arange(b), first]] = 1.0
        prev = torch.zeros(b, 1, n, n)
        prev[:, 0, torch.arange(1, n), torch.arange(n - 1)] = 1.0
        prev[:, 0, 0, 0] = 1.0
        return SimpleNamespace(logits=logits, attentions=(prev,) if output_attentions else None)


def test_evaluation_scores_a_positional_model_by_order(hf):
    from actwh.compute.default_model.corpus import NAMES, NameSplit
    from actwh.compute.default_model.train import evaluate

    vocab = hf[1].get_vocab()
    m = evaluate(FirstNameModel(vocab, NAMES), vocab, NameSplit.make(0), seed=3, n=50)
    assert m["ioi_abb_held_out_pairs"] == m["ioi_abb_unseen_names"] == 1.0
    assert m["ioi_bab_held_out_pairs"] == m["ioi_bab_unseen_names"] == 0.0
    assert m["previous_token_score"] == pytest.approx(1.0) and m["induction_score"] == 0.0
    assert m["previous_token_head"] == "L0H0"


def test_attention_only_layers_stay_attention_only():
    from transformers import GPT2Config, GPT2LMHeadModel

    from actwh.compute.default_model.train import zero_mlp

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=20, n_positions=8, n_embd=16, n_layer=2, n_head=2))
    zero_mlp(model, 0)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.1,
                            weight_decay=0.1)
    ids = torch.randint(20, (4, 8))
    for _ in range(3):
        model(ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
    block = model.transformer.h[0]
    x = torch.randn(2, 8, 16)
    assert block.mlp(block.ln_2(x)).abs().max() == 0
    assert model.transformer.h[1].mlp(x).abs().max() > 0


def test_shipped_attention_only_layers_have_zero_mlps():
    from safetensors.torch import load_file

    summary = json.loads((WEIGHTS / "train_summary.json").read_text())
    state = load_file(WEIGHTS / "model.safetensors")
    # the card calls a layer attention-only exactly when the trainer made it so
    assert ("MLP is zero and was frozen at zero" in CARD.read_text()) == bool(summary["attn_only_layers"])
    for layer in summary["attn_only_layers"]:
        mlp = {k: v for k, v in state.items() if k.startswith(f"transformer.h.{layer}.mlp.")}
        assert len(mlp) == 4 and all(v.abs().max() == 0 for v in mlp.values())


def test_planted_previous_token_head_attends_to_the_previous_token_and_stays_fixed():
    from transformers import GPT2Config, GPT2LMHeadModel

    from actwh.compute.default_model.train import (
        freeze_query_key, plant_previous_token_head, restore_frozen,
    )

    torch.manual_seed(1)
    cfg = GPT2Config(vocab_size=60, n_positions=40, n_embd=64, n_layer=2, n_head=2,
                     attn_implementation="eager", attn_pdrop=0, resid_pdrop=0, embd_pdrop=0)
    model = GPT2LMHeadModel(cfg)
    plant_previous_token_head(model)
    ids = torch.randint(60, (6, 40))
    with torch.no_grad():
        pat = model(ids, output_attentions=True).attentions[0]
    q = torch.arange(1, 40)
    assert pat[:, 0, q, q - 1].mean() >= 0.9  # the planted head, before any training
    assert pat[:, 1, q, q - 1].mean() <= 0.5  # a random one
    freeze_query_key(model, 0, 0)
    before = model.transformer.h[0].attn.c_attn.weight.detach().clone()
    opt = torch.optim.AdamW(model.parameters(), lr=0.05, weight_decay=0.1)
    for _ in range(3):
        model(ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
        restore_frozen(model)
    after = model.transformer.h[0].attn.c_attn.weight.detach()
    q_k = torch.cat([torch.arange(0, 32), torch.arange(64, 96)])  # head 0's query and key columns
    assert torch.equal(before[:, q_k], after[:, q_k])
    assert not torch.equal(before[:, 32:64], after[:, 32:64])  # head 1's query still trains
    assert not torch.equal(before[:, 128:], after[:, 128:])  # values train


def test_previous_token_attention_loss_is_the_cross_entropy_against_the_previous_token():
    from actwh.compute.default_model.train import previous_token_attention_loss

    n = 6
    exact = torch.zeros(2, 3, n, n)
    exact[:, :, 0, 0] = 1.0
    exact[:, :, torch.arange(1, n), torch.arange(n - 1)] = 1.0
    causal_uniform = torch.tril(torch.ones(n, n)) / torch.arange(1, n + 1)[:, None]
    pats = exact.clone()
    pats[:, 1] = causal_uniform  # head 1 spreads its attention evenly over the prefix
    # query p (1..n-1) gives 1/(p+1) to p-1: the loss is the mean of log(p + 1)
    want = sum(torch.log(torch.tensor(p + 1.0)) for p in range(1, n)) / (n - 1)
    assert previous_token_attention_loss([pats], 0, 0).item() == pytest.approx(0.0, abs=1e-6)
    assert previous_token_attention_loss([exact, pats], 1, 1).item() == pytest.approx(want.item(), rel=1e-6)
    # gradients reach the pattern: the loss trains the supervised head only
    p = pats.clone().requires_grad_(True)
    previous_token_attention_loss([p], 0, 1).backward()
    assert p.grad[:, 1].abs().sum() > 0 and p.grad[:, [0, 2]].abs().sum() == 0


def test_induction_attention_loss_targets_the_token_after_the_last_earlier_occurrence():
    from actwh.compute.default_model.train import induction_attention_loss, induction_targets

    # BOS a b c a b x b b: a at 4 follows a at 1 -> 2; b at 5 -> 3; b at 7 -> the b at 5 -> 6;
    # b at 8: the b just before it (7) gives no target, the one at 5 does -> 6
    rows = torch.tensor([[0, 5, 6, 7, 5, 6, 9, 6, 6],
                         [0, 8, 8, 0, 8, 3, 4, 3, 0]])
    assert induction_targets(rows).tolist() == [[-1, -1, -1, -1, 2, 3, -1, 6, 6],
                                                [-1, -1, -1, 1, 3, -1, -1, 6, 4]]
    n = rows.shape[1]
    uniform = (torch.tril(torch.ones(n, n)) / torch.arange(1, n + 1)[:, None]).expand(2, 3, n, n).clone()
    # head 2 of row 0 attends exactly where induction says; row 1's BOS queries (3, 8) are skipped
    uniform[0, 2, [4, 5, 7, 8]] = 0.0
    uniform[0, 2, [4, 5, 7, 8], [2, 3, 6, 6]] = 1.0
    # valid queries: row 0 -> 4, 5, 7, 8 (1 each for head 2); row 1 -> 4 (1/5), 7 (1/8), the
    # BOS queries 3 and 8 excluded
    want = (4 * 0.0 + torch.log(torch.tensor(5.0)) + torch.log(torch.tensor(8.0))) / 6
    assert induction_attention_loss([uniform], rows, 0, 2, skip=0).item() == pytest.approx(want.item(), rel=1e-6)
    # without the skip, row 1's BOS queries count too (q=3 -> 1: 1/4, q=8 -> 4: 1/9)
    want_all = (torch.log(torch.tensor(5.0 * 8 * 4 * 9))) / 8
    assert induction_attention_loss([uniform], rows, 0, 2).item() == pytest.approx(want_all.item(), rel=1e-6)


def test_abb_share_sets_the_share_of_answer_first_training_sentences():
    from actwh.compute.default_model.corpus import Corpus, NameSplit, all_words

    split = NameSplit.make(0)
    for share, lo, hi in [(0.8, 0.74, 0.86), (0.5, 0.44, 0.56)]:
        gen = Corpus(1, split, all_words(), abb_share=share)
        first = []
        for _ in range(600):
            doc = gen.ioi()
            io = doc[-2]  # the document ends with the answer and a full stop
            names = [w for w in doc if w in split.ioi_names]
            first.append(names[-4] == io)  # the first clause names A, B; then S, then the answer
        assert lo <= sum(first) / len(first) <= hi, (share, sum(first) / len(first))


def test_reinit_key_restarts_only_that_heads_key():
    from transformers import GPT2Config, GPT2LMHeadModel

    from actwh.compute.default_model.train import reinit_key

    torch.manual_seed(2)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=30, n_positions=8, n_embd=32, n_layer=3, n_head=4))
    with torch.no_grad():  # a trained-looking start, far from GPT-2's initial scale
        for block in model.transformer.h:
            block.attn.c_attn.weight.mul_(50)
            block.attn.c_attn.bias.fill_(1.0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    reinit_key(model, 2, 1, seed=0)
    after = model.state_dict()
    w, b = after["transformer.h.2.attn.c_attn.weight"], after["transformer.h.2.attn.c_attn.bias"]
    key = torch.zeros(96, dtype=torch.bool)
    key[32 + 8:32 + 16] = True  # layer 2, head 1's key columns: after the 32 query columns
    assert w[:, key].std() < 0.03 and (b[key] == 0).all()
    assert torch.equal(w[:, ~key], before["transformer.h.2.attn.c_attn.weight"][:, ~key])
    assert torch.equal(b[~key], before["transformer.h.2.attn.c_attn.bias"][~key])
    assert all(torch.equal(v, before[k]) for k, v in after.items() if "h.2.attn.c_attn" not in k)


def test_the_cards_training_commands_are_the_recorded_runs():
    """The card's reproduction commands parse with the trainer's own command line, chain their
    runs (--out runK, then --init runK) and carry each run's recorded options."""
    from actwh.compute.default_model.train import parser
    from actwh.model_card import lineage, training_paragraph

    summary = json.loads((WEIGHTS / "train_summary.json").read_text())
    curve = [json.loads(line) for line in (WEIGHTS / "train_log.jsonl").read_text().splitlines()]
    paragraph = training_paragraph({**summary, "stopped_at": curve[-1]["step"]})
    text = " ".join(CARD.read_text().split())
    assert " ".join(paragraph.split()) in text  # the card is what the card script writes now
    commands = re.findall(r"`python -m actwh\.compute\.default_model\.train ([^`]*)`", paragraph)
    chain = lineage(summary)
    assert len(commands) == len(chain) >= 1
    count = ["one", "two", "three", "four", "five", "six", "seven", "eight"][len(chain) - 1]
    assert len(chain) == 1 or f"trained in {count} runs" in " ".join(README.read_text().split())
    for k, (command, run) in enumerate(zip(commands, chain), 1):
        args = parser().parse_args(shlex.split(command))
        assert (args.steps, args.seed, args.batch, args.lr) == (run["steps"], run["seed"], run["batch"],
                                                                run["lr"])
        assert args.supervise_previous_token == run.get("supervised_previous_token_head")
        assert args.supervise_induction == run.get("supervised_induction_head")
        assert args.reinit_key == run.get("reinitialised_key")
        assert args.abb_share == run.get("ioi_abb_share", 0.5)
        if k < len(chain):  # an earlier run: stopped at its best checkpoint, written where the next reads
            assert str(args.out) == f"run{k}" and args.stop_at in (None, run["step"])
        if k > 1:
            assert str(args.init) == f"run{k - 1}"


def test_card_ioi_heads_attend_where_the_card_says():
    """The card's words for each IOI head that it says attends to the word after the subject's
    second mention hold on the shipped IOI prompts, measured with plain transformers."""
    model, tok = None, None
    text = CARD.read_text()
    said = re.findall(r"- \*\*(L\d+H\d+)\*\*: attends from the final position to the word after the "
                      r"subject's second mention", text)
    assert said, "the card names no such head (update this test with the card)"
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(WEIGHTS, attn_implementation="eager").eval()
    tok = AutoTokenizer.from_pretrained(WEIGHTS)
    rows = [json.loads(line) for line in (PROMPTS / "ioi.jsonl").read_text().splitlines()]
    for head in said:
        L, h = map(int, re.findall(r"\d+", head))
        weights = []
        for r in rows:
            ids = tok(r["text"]).input_ids
            words = tok.convert_ids_to_tokens(ids)
            s2 = len(words) - 1 - words[::-1].index(r["distractor"])
            with torch.no_grad():
                pat = model(torch.tensor([ids]), output_attentions=True).attentions[L][0, h, -1]
            weights.append(pat[s2 + 1].item())
        assert sum(weights) / len(weights) >= 0.4, (head, weights)


def test_a_continued_run_records_the_whole_chain_it_continued_from(tmp_path):
    """init_summary nests each earlier run's summary, also under a summary written before nesting
    existed (which names its init folder only)."""
    from actwh.compute.default_model.train import init_summary

    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    (tmp_path / "a" / "train_summary.json").write_text(json.dumps({"step": 1, "init": None}))
    (tmp_path / "b" / "train_summary.json").write_text(json.dumps({"step": 2, "init": str(tmp_path / "a")}))
    got = init_summary(tmp_path / "b")
    assert got["step"] == 2 and got["init_summary"] == {"step": 1, "init": None}
    assert init_summary(tmp_path / "missing") is None
