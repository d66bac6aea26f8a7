"""launch/colab_tpu_demo.ipynb: valid nbformat 4 JSON whose code cells parse and whose commands, modules,
config paths, pins and output files exist in this repository."""

from __future__ import annotations

import ast
import importlib
import importlib.util
import json
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
NOTEBOOK = ROOT / "launch" / "colab_tpu_demo.ipynb"


def load(path: Path = NOTEBOOK) -> dict:
    return json.loads(path.read_text())


def code_cells(nb: dict) -> list[str]:
    return ["".join(cell["source"]) for cell in nb["cells"] if cell["cell_type"] == "code"]


def shell_lines(nb: dict) -> list[str]:
    """IPython shell (!) and magic (%) lines of the code cells, without the prefix."""
    return [line.strip()[1:] for src in code_cells(nb) for line in src.splitlines()
            if line.strip().startswith(("!", "%"))]


def settings(nb: dict) -> dict:
    """The constant assignments of the code cells (REPO_URL, WORKDIR, ...)."""
    out = {}
    for src in code_cells(nb):
        for node in ast.parse(python_only(src)).body:
            if isinstance(node, ast.Assign) and isinstance(node.value, ast.Constant):
                out.update({t.id: node.value.value for t in node.targets if isinstance(t, ast.Name)})
    return out


def python_only(src: str) -> str:
    """The cell with its shell/magic lines replaced by `pass` (valid Python, line numbers kept)."""
    return "\n".join("pass" if line.strip().startswith(("!", "%")) else line for line in src.splitlines())


def check_structure(nb: dict) -> None:
    """nbformat 4 structure checked by nbformat's own schema; raises ValueError naming the problem."""
    import nbformat
    if nb.get("nbformat") != 4:
        raise ValueError(f"not an nbformat 4 notebook: nbformat={nb.get('nbformat')!r}")
    try:
        nbformat.validate(nbformat.from_dict(nb), version=4)
    except nbformat.ValidationError as err:
        raise ValueError(f"invalid notebook: {err.message}") from None
    if not nb["cells"]:
        raise ValueError("a notebook needs a non-empty cells list")


def test_notebook_is_valid_nbformat_4_with_fresh_outputs():
    nb = load()
    check_structure(nb)
    assert nb["metadata"]["accelerator"] == "TPU"
    assert all(cell["outputs"] == [] and cell["execution_count"] is None
               for cell in nb["cells"] if cell["cell_type"] == "code")
    for src in code_cells(nb):
        ast.parse(python_only(src))            # every code cell is Python once shell/magic lines are set aside


def test_structure_check_names_the_problem():
    nb = load()
    with pytest.raises(ValueError, match="nbformat 4"):
        check_structure({**nb, "nbformat": 3})
    broken = json.loads(json.dumps(nb))
    del broken["cells"][1]["outputs"]
    with pytest.raises(ValueError, match="outputs"):
        check_structure(broken)
    with pytest.raises(ValueError, match="'cell_type': 'text'.* is not valid"):
        check_structure({**nb, "cells": [{**nb["cells"][0], "cell_type": "text"}]})


def test_install_cell_uses_a_marked_repo_url_and_the_pinned_jax():
    nb = load()
    values = settings(nb)
    assert "REPO_URL" in values and values["REPO_URL"].endswith(".git")
    assert any("REPO_URL" in line and "replace" in line for src in code_cells(nb) for line in src.splitlines()
               if line.startswith("REPO_URL"))                                    # clearly marked to edit
    pin = re.search(r"^jax==(\S+)$", (ROOT / "requirements.txt").read_text(), re.M).group(1)
    assert values["JAX_VERSION"] == pin
    shell = shell_lines(nb)
    clone = next(line for line in shell if line.startswith("git clone"))
    assert "{REPO_URL}" in clone and "{BRANCH}" in clone
    target = clone.split()[-1]
    assert f"cd {target}" in shell                                                # runs from the checkout
    assert any(line.startswith("pip install") and "-e ." in line and '"jax[tpu]=={JAX_VERSION}"' in line
               for line in shell)
    assert (ROOT / "setup.py").exists()


def test_commands_reference_modules_and_configs_that_exist():
    nb = load()
    runs = [line for line in shell_lines(nb) if line.startswith("python -m ")]
    assert runs, "the notebook runs no python -m command"
    for line in runs:
        module = line.split()[2]
        assert importlib.util.find_spec(module) is not None, module
        config = re.search(r"--config=(\S+)", line).group(1)
        path, _, variants = config.partition(":")
        assert (ROOT / path).is_file(), path
        spec = importlib.util.spec_from_file_location("notebook_config", ROOT / path)
        config_module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(config_module)
        cfg = config_module.get_config(variants or None)
        assert [s.stage for s in cfg.stages] == ["pretrain", "sft", "rl"]     # the embedded demo chain
        assert all(s.mesh.devices == 1 for s in cfg.stages)   # the notebook says the demo runs on one device
        assert "--workdir={WORKDIR}" in line
    # the smoke variant the notebook mentions exists too
    assert any(":smoke" in "".join(c["source"]) for c in nb["cells"])
    importlib.import_module("experiments.configs.demo").get_config("smoke")


def test_results_cell_reads_the_files_the_run_writes():
    import inspect
    from experiments import report
    nb = load()
    shown = re.findall(r'os\.path\.join\(WORKDIR, "([^"]+)"\)', "".join(code_cells(nb)))
    assert sorted(shown) == ["curves.png", "report.md"]
    source = inspect.getsource(report.write_report)
    assert all(f'"{name}"' in source for name in shown)
    assert "write_report(summaries, workdir, seconds)" in (ROOT / "experiments" / "run.py").read_text()
