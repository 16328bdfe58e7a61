"""The public facade: `import actwh` is cheap, gives what a notebook needs, and the README's
Python section runs as written."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import actwh

README = Path(__file__).parents[1] / "README.md"


def test_import_is_cheap_and_the_cli_starts_without_torch():
    code = ("import sys, actwh, actwh.cli.main; "
            "print(sorted(m for m in ('torch', 'transformers', 'duckdb', 'polars', 'numpy') "
            "if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_layering():
    """The warehouse and the saved queries never load torch; compute never imports the
    warehouse; from the root package, compute and warehouse use only errors and the ontology."""
    code = ("import sys, actwh.warehouse, actwh.warehouse.store, actwh.queries.loader, "
            "actwh.queries.circuit, actwh.ontology; print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
    root = Path(__file__).parents[1]
    roots = re.compile(r"^\s*(?:from|import) actwh\.(\w+)", re.M)
    for folder, allowed in (("compute", {"compute", "errors", "ontology"}),
                            ("warehouse", {"warehouse", "errors", "ontology"})):
        for path in (root / folder).rglob("*.py"):
            used = set(roots.findall(path.read_text()))
            assert used <= allowed, f"{path.relative_to(root)} imports actwh.{used - allowed}"
            assert "model_card" not in path.read_text(), f"{path} imports the card script"


def test_every_exported_name_resolves():
    for name in actwh.__all__:
        assert getattr(actwh, name) is not None, name
    assert "Warehouse" in dir(actwh)
    import pytest

    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        actwh.nope  # noqa: B018


def python_section() -> str:
    text = README.read_text()
    start = text.index("In Python")
    return re.search(r"```python\n(.*?)```", text[start:], re.S).group(1)


def test_readme_python_section_uses_only_the_facade_and_runs(tmp_path, capsys):
    code = python_section()
    assert "import actwh\n" in code
    assert not re.search(r"^\s*(from|import) (?!actwh$)", code, re.M)  # nothing but `import actwh`
    used = set(re.findall(r"\bactwh\.(\w+)", code.replace('"actwh.duckdb"', "")))
    assert used and used <= set(actwh.__all__), used - set(actwh.__all__)
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        scope: dict = {}
        exec(compile(code, str(README) + ":python", "exec"), scope)
    finally:
        os.chdir(cwd)
    # what it computed is what the parts say, on the default model
    import torch

    b, model = scope["batch"], scope["model"]
    with torch.no_grad():
        logits = model(b.tokens)[0, -1]
    want = logits[b.target_ids[0]] - logits[b.distractor_ids[0]]
    assert torch.allclose(scope["res"].metric[0], want, atol=1e-5) and want > 0  # IOI: Mary
    assert scope["graph"].values.dim() == 3
    assert scope["run"].status == "complete" and scope["df"].height > 0
    assert capsys.readouterr().out.startswith("digraph circuit")
    assert (tmp_path / "actwh.duckdb").exists()
