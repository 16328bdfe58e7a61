"""Every bad input: one line naming the problem, exit status != 0, the warehouse's bytes unchanged.

One table, one row per case (issue #16's list): the command, and a fragment its one-line error
must contain. Every case runs against a copy of the same warehouse (one complete run with edges)
and the copy's bytes are compared before and after, so a case that starts a run, leaves a
`running` row or touches the file fails here.
"""

from __future__ import annotations

import hashlib
import json
import shutil

import duckdb
import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

from actwh.cli.main import cli

from conftest import IOI_ROWS, write_prompts
from test_sae import write_saelens


def digest(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def base(tmp_path_factory, gpt2_dir):
    """A warehouse with one complete run (edges included), and variants of the inputs."""
    tmp = tmp_path_factory.mktemp("bad")
    prompts = write_prompts(tmp / "good.jsonl")
    db = tmp / "wh.duckdb"
    r = CliRunner().invoke(cli, ["populate", str(prompts), "--model", str(gpt2_dir), "--db", str(db),
                                 "--edges", "--top", "0"])
    assert r.exit_code == 0, r.output
    return tmp, prompts, db


def model_variant(tmp, gpt2_dir, name, change):
    folder = tmp / name
    if not folder.exists():
        shutil.copytree(gpt2_dir, folder)
        change(folder)
    return str(folder)


def edit_config(**kv):
    def change(folder):
        cfg = json.loads((folder / "config.json").read_text())
        for k, v in kv.items():
            if v is None:
                cfg.pop(k)
            else:
                cfg[k] = v
        (folder / "config.json").write_text(json.dumps(cfg))
    return change


def nan_weights(folder):
    w = load_file(folder / "model.safetensors")
    key = sorted(k for k in w if k.endswith("mlp.c_fc.weight"))[0]
    w[key][0, 0] = float("nan")
    save_file(w, folder / "model.safetensors", metadata={"format": "pt"})


def truncate_weights(folder):
    data = (folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(data[: len(data) // 3])


def no_tokenizer(folder):
    for f in folder.iterdir():
        if "token" in f.name or f.name in ("vocab.json", "merges.txt"):
            f.unlink()


def sae_variant(tmp, name, change=None):
    folder = tmp / name
    if not folder.exists():
        write_saelens(folder, 32, 8, "blocks.0.hook_mlp_out")
        if change:
            change(folder)
    return str(folder)


def sae_nan(folder):
    w = load_file(folder / "sae_weights.safetensors")
    w["W_dec"][1, 2] = float("nan")
    save_file(w, folder / "sae_weights.safetensors")


def sae_bad_shape(folder):
    w = load_file(folder / "sae_weights.safetensors")
    w["W_dec"] = w["W_dec"][:, :5].contiguous()
    save_file(w, folder / "sae_weights.safetensors")


def jsonl(tmp, name, rows):
    path = tmp / name
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return str(path)


def schema_abc(db):
    con = duckdb.connect(str(db))
    con.execute("UPDATE actwh_meta SET value = 'abc' WHERE key = 'schema_version'")
    con.close()


def cases(tmp, prompts, db, gpt2_dir):
    """(id, argv, expected fragment, warehouse to compare or None for the shared one)."""
    P = ["populate", str(prompts), "--model", str(gpt2_dir), "--db", str(db), "--top", "0"]
    row = IOI_ROWS[0]
    sae = sae_variant(tmp, "sae_ok")
    yield "target_not_in_vocabulary", ["populate", jsonl(tmp, "zebra.jsonl", [{**row, "target": "zebra"}]),
                                       *P[2:]], "'zebra' is not in the vocabulary"
    yield "config_fewer_layers", [*P, "--model", model_variant(tmp, gpt2_dir, "fewer", edit_config(n_layer=1))], \
        "declares 1 layers but the weights hold 2"
    yield "upper_case_jsonl_is_jsonl", ["populate", jsonl(tmp, "P.JSONL", ['{"text": 5}']), *P[2:]], \
        'needs a JSON object with a string "text"'
    yield "json_suffix", ["populate", jsonl(tmp, "p.json", [row]), *P[2:]], "a .json file is not read"
    yield "empty_text", ["populate", jsonl(tmp, "empty.jsonl", [{"text": ""}]), *P[2:]], '"text" is empty'
    yield "threshold_nan", [*P, "--select", "threshold:nan:mlp_act_times_grad"], "must be a finite number"
    yield "edges_threshold_nan", [*P, "--edges", "--edges-select", "threshold:nan"], "must be a finite number"
    yield "scalars_comma", [*P, "--scalars", ","], "no scalars given"
    yield "nan_model_weights", [*P, "--model", model_variant(tmp, gpt2_dir, "nan", nan_weights)], \
        "holds NaN or infinite values"
    yield "nan_sae_weights", [*P, "--sae", sae_variant(tmp, "sae_nan", sae_nan)], "W_dec holds NaN"
    yield "no_tokenizer", [*P, "--model", model_variant(tmp, gpt2_dir, "notok", no_tokenizer)], "has no tokenizer"
    yield "circuit_negative_n", ["circuit", "1", "0", "--method", "top-n", "-n", "-5", "--db", str(db)], \
        "-n must be a whole number >= 1"
    yield "baseline_without_edges", [*P, "--edges-baseline", "corrupt"], "--edges-baseline applies to edges"
    yield "ig_steps_without_edges", [*P, "--ig-steps", "3"], "--ig-steps applies to edges"
    yield "detach_ln_with_edges", [*P, "--edges", "--detach-ln"], "--detach-ln applies to scalars"
    yield "query_misspelled_scalar", ["query", "top_nodes", "-p", "run=1", "-p", "prompt=0", "-p",
                                      "scalar=mlp_act_times_gard", "--db", str(db)], \
        "scalar='mlp_act_times_gard' is not a scalar; valid: "
    yield "query_missing_run", ["query", "top_nodes", "-p", "run=7", "-p", "prompt=0", "--db", str(db)], \
        "run=7 matches no run; runs: 1"
    yield "query_missing_prompt", ["query", "top_nodes", "-p", "run=1", "-p", "prompt=99", "--db", str(db)], \
        "prompt=99 is not in run 1; its prompts: 0..5"
    yield "device_banana", [*P, "--device", "banana"], "unknown device 'banana'"
    if not torch.cuda.is_available():
        yield "device_cuda", [*P, "--device", "cuda"], "no CUDA device is available"
    if not torch.backends.mps.is_available():
        yield "device_mps", [*P, "--device", "mps"], "MPS is not available"
    yield "predict_device_banana", ["predict", "the cat", "--model", str(gpt2_dir), "--device", "banana"], \
        "unknown device"
    yield "config_missing_key", [*P, "--model", model_variant(tmp, gpt2_dir, "nokey", edit_config(n_embd=None))], \
        "lacks 'n_embd'"

    def list_config(folder):
        (folder / "config.json").write_text("[1, 2]")
    yield "config_is_a_list", [*P, "--model", model_variant(tmp, gpt2_dir, "listcfg", list_config)], \
        "holds a list, not an object"
    yield "damaged_weights", [*P, "--model", model_variant(tmp, gpt2_dir, "trunc", truncate_weights)], \
        "damaged or not a weights file"

    def sae_cfg_garbage(folder):
        (folder / "cfg.json").write_text("{not json")
    yield "sae_config_damaged", [*P, "--sae", sae_variant(tmp, "sae_cfg", sae_cfg_garbage)], \
        "damaged or malformed autoencoder files"

    def sae_cfg_list(folder):
        (folder / "cfg.json").write_text("[]")
    yield "sae_config_list", [*P, "--sae", sae_variant(tmp, "sae_list", sae_cfg_list)], "holds a list"

    def sae_weights_garbage(folder):
        (folder / "sae_weights.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00garbage!")
    yield "sae_weights_damaged", [*P, "--sae", sae_variant(tmp, "sae_w", sae_weights_garbage)], \
        "damaged or malformed autoencoder files"
    yield "sae_shapes", [*P, "--sae", sae_variant(tmp, "sae_shape", sae_bad_shape)], "W_dec has shape (8, 5)"
    yield "sae_site_without_sae", [*P, "--sae", sae, "--sae-site", "blocks.0.hook_mlp_out", "--sae-site",
                                   "blocks.1.hook_mlp_out"], "2 --sae-site for 1 --sae"
    yield "corrupt_not_text", ["populate", jsonl(tmp, "corrupt.jsonl", [{**row, "corrupt": 7}]), *P[2:],
                               "--edges"], "corrupt must be a text, not 7"
    yield "sql_no_result", ["sql", "SET threads = 1", "--db", str(db)], "returns no rows to show"
    yield "sql_empty", ["sql", "  ", "--db", str(db)], "empty query"
    yield "db_in_missing_folder", [*P[:4], "--db", str(tmp / "nope" / "wh.duckdb"), "--top", "0"], \
        "no folder"
    yield "db_is_a_folder", [*P[:4], "--db", str(tmp), "--top", "0"], "is a folder"
    yield "dot_unwritable", ["circuit", "1", "0", "--db", str(db), "--dot", str(tmp / "nope" / "c.dot")], \
        "No such file or directory"
    yield "json_unwritable", ["circuit", "1", "0", "--db", str(db), "--json", str(tmp / "nope" / "c.json")], \
        "No such file or directory"
    yield "export_under_a_file", ["export", "1", str(prompts / "out"), "--db", str(db)], "cannot write to"
    yield "sql_missing_folder", ["sql", "SELECT 1", "--db", str(tmp / "nope" / "wh.duckdb")], "no warehouse at"
    yield "missing_param", ["sql", "SELECT $missing AS x", "--db", str(db)], "uses $missing"
    yield "unused_param", ["sql", "SELECT 1 AS x", "-p", "run=1", "--db", str(db)], "'run' is not used"
    yield "bad_typed_param", ["sql", "SELECT $x AS x", "-p", "x=int:abc", "--db", str(db)], "'abc' is not int"
    yield "batch_size_zero", [*P, "--batch-size", "0"], "--batch-size must be a whole number >= 1"
    yield "batch_size_negative", [*P, "--batch-size", "-1"], "--batch-size must be a whole number >= 1"
    yield "ig_steps_negative", [*P, "--edges", "--edges-baseline", "corrupt", "--ig-steps", "-3"], \
        "--ig-steps must be a whole number >= 0"
    yield "jsonl_target_true", ["populate", jsonl(tmp, "true.jsonl", [{**row, "target": True}]), *P[2:]], \
        "target must be a token string or a token id, not true"
    yield "resume_with_options", ["populate", "--db", str(db), "--resume", "1", "--batch-size", "2"], \
        "--resume continues a run with its stored options; remove --batch-size"
    yield "resume_unknown_run", ["populate", "--db", str(db), "--resume", "5"], "no run 5"
    yield "edges_into_zero", [*P, "--edges-into", "top:0"], "use top:N (N >= 1) or latents"
    yield "edges_into_latents_no_sae", [*P, "--edges-into", "latents"], "give --sae DIR"
    yield "delete_unknown_run", ["runs", "--delete", "4", "--db", str(db)], "no run 4"
    yield "circuit_unknown_run", ["circuit", "3", "0", "--db", str(db)], "no run 3"


def test_every_bad_input_is_one_line_nonzero_and_writes_nothing(base, gpt2_dir, tmp_path):
    tmp, prompts, db = base
    runner = CliRunner()
    seen = []
    failures = []
    for case_id, argv, expect in cases(tmp, prompts, db, gpt2_dir):
        before = digest(db)
        result = runner.invoke(cli, argv)
        lines = [l for l in result.output.splitlines() if l.strip()]
        ok = (result.exit_code not in (0, None) and len(lines) == 1 and lines[0].startswith("Error: ")
              and expect in lines[0] and "Traceback" not in result.output and digest(db) == before)
        if not ok:
            failures.append(f"{case_id}: exit {result.exit_code}, {result.output!r}")
        seen.append(case_id)
    assert not failures, "\n".join(failures)
    assert len(seen) >= 45
    con = duckdb.connect(str(db), read_only=True)
    assert con.execute("SELECT run_id, status FROM runs").fetchall() == [(1, "complete")]
    con.close()


def test_schema_version_that_is_not_a_number(base, tmp_path):
    _, _, db = base
    copy = tmp_path / "abc.duckdb"
    shutil.copy(db, copy)
    schema_abc(copy)
    before = digest(copy)
    for argv in (["sql", "SELECT 1 AS x", "--db", str(copy)], ["runs", "--db", str(copy)]):
        r = CliRunner().invoke(cli, argv)
        assert r.exit_code == 1 and r.output.strip() == (
            f"Error: {copy} has schema version abc; this actwh reads version 1"), r.output
    assert digest(copy) == before


def test_unknown_prompt_words_warn_with_the_count(base, gpt2_dir, tmp_path):
    _, _, _ = base
    prompts = jsonl(tmp_path, "unk.jsonl", [{"text": "the zebra and the okapi went to", "target": "Mary"},
                                             {"text": "the cat", "target": "dog"}])
    db = tmp_path / "wh.duckdb"
    r = CliRunner().invoke(cli, ["populate", prompts, "--model", str(gpt2_dir), "--db", str(db),
                                 "--top", "0"])
    assert r.exit_code == 0, r.output
    assert "Warning: 2 prompt tokens are unknown to the tokenizer (<unk>) in 1 of 2 prompts" in r.output


def test_typed_parameters_bind_text_and_numbers(base):
    _, _, db = base
    runner = CliRunner()
    r = runner.invoke(cli, ["sql", "SELECT typeof($a) AS a, $a AS v, typeof($b) AS b, typeof($c) AS c",
                            "-p", "a=str:0001", "-p", "b=0001", "-p", "c=float:2", "--db", str(db),
                            "--format", "csv"])
    assert r.exit_code == 0, r.output
    assert r.output.splitlines()[1] == "VARCHAR,0001,INTEGER,DOUBLE"


def test_ctrl_c_is_one_line(base, monkeypatch):
    from actwh.warehouse.store import Warehouse

    _, _, db = base

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(Warehouse, "sql", interrupted)
    r = CliRunner().invoke(cli, ["sql", "SELECT 1", "--db", str(db)])
    assert r.exit_code == 130 and r.output.strip() == "Error: interrupted"


def test_ctrl_c_stops_a_running_query_with_one_line(base):
    """A real SIGINT while DuckDB computes (DuckDB does not see Python's signal on its own)."""
    import os
    import signal
    import subprocess
    import sys
    import time

    _, _, db = base
    proc = subprocess.Popen([sys.executable, "-m", "actwh.cli", "sql",
                             "SELECT count(*) AS n FROM range(100000000000) r WHERE r.range % 7 = 3",
                             "--db", str(db)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    tick = os.sysconf("SC_CLK_TCK")
    t0 = time.monotonic()
    while time.monotonic() - t0 < 120:  # well into the query: imports take ~1 s of CPU
        fields = open(f"/proc/{proc.pid}/stat").read().rsplit(")", 1)[1].split()
        if (int(fields[11]) + int(fields[12])) / tick > 4:
            break
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and err.strip() == "Error: interrupted" and out == "", err


def test_ctrl_c_while_the_commands_load_is_one_line_and_130():
    """An interrupt that lands while `actwh` imports its commands (before the commands' own
    handler exists): the program entry point ends it as a command's interrupt ends."""
    import os
    import subprocess
    import sys

    code = ("import builtins\n"
            "real = builtins.__import__\n"
            "def interrupted(name, *a, **k):\n"
            "    if name == 'actwh.cli.main':\n"
            "        raise KeyboardInterrupt\n"
            "    return real(name, *a, **k)\n"
            "builtins.__import__ = interrupted\n"
            "import runpy\n"
            "runpy.run_module('actwh.cli', run_name='__main__')\n")
    r = subprocess.run([sys.executable, "-c", code, "--help"], capture_output=True, text=True,
                       env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=120)
    assert r.returncode == 130 and r.stderr == "Error: interrupted\n" and r.stdout == "", r.stderr
    # the installed console script is that entry point
    from importlib.metadata import entry_points

    (script,) = [e for e in entry_points(group="console_scripts") if e.name == "actwh"]
    assert script.value == "actwh.cli:main"
