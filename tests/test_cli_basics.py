"""CLI basics: help on every command, version, and one-line errors for bad models and prompts."""

from __future__ import annotations

import json

from click.testing import CliRunner

from actwh.cli.main import cli

from conftest import save_tiny


def all_commands(group=cli, prefix=()):
    for name, cmd in group.commands.items():
        yield (*prefix, name), cmd
        if hasattr(cmd, "commands"):
            yield from all_commands(cmd, (*prefix, name))


def test_every_command_has_help():
    runner = CliRunner()
    for path, cmd in all_commands():
        assert cmd.help, f"{' '.join(path)} has no help text"
        result = runner.invoke(cli, [*path, "--help"])
        assert result.exit_code == 0, path


def test_version():
    from actwh import __version__

    result = CliRunner().invoke(cli, ["--version"])
    assert result.exit_code == 0 and __version__ in result.output


def one_line_error(result, *fragments):
    assert result.exit_code != 0
    lines = [l for l in result.output.strip().splitlines() if l]
    assert len(lines) == 1, result.output
    assert lines[0].startswith("Error: ")
    for f in fragments:
        assert f in lines[0], lines[0]
    assert "Traceback" not in result.output


def test_bad_model_folders_give_one_line_errors(tmp_path):
    runner = CliRunner()
    one_line_error(runner.invoke(cli, ["predict", "hi", "--model", str(tmp_path / "x")]),
                   "not found")
    one_line_error(runner.invoke(cli, ["predict", "hi", "--model", str(tmp_path)]),
                   "no config.json")
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "t5"}))
    one_line_error(runner.invoke(cli, ["predict", "hi", "--model", str(tmp_path)]),
                   "unsupported model_type 't5'", "gpt2", "llama")


def test_prompt_longer_than_context(tmp_path):
    folder = save_tiny("gpt2", tmp_path)
    text = " ".join(["the"] * 80)  # the tiny models' context is 64
    one_line_error(CliRunner().invoke(cli, ["predict", text, "--model", str(folder)]),
                   "longer than the context (64)")


def test_progress_reports_prompts_rate_and_eta_on_a_terminal(capsys):
    from actwh.runner import Progress

    bar = Progress(4, enabled=True)
    bar.update(2, 100)
    bar.close()
    err = capsys.readouterr().err
    assert "2/4 prompts" in err and "tokens/s" in err and "ETA" in err
    quiet = Progress(4, enabled=False)
    quiet.update(2, 100)
    assert capsys.readouterr().err == ""


def test_examples_lists_existing_prompt_files():
    from pathlib import Path

    r = CliRunner().invoke(cli, ["examples"])
    paths = [Path(p) for p in r.output.split()]
    assert r.exit_code == 0 and len(paths) == 3 and all(p.is_file() for p in paths)
