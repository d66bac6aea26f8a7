"""Every command line's --help shows its module docstring whole (no description cut after the first line)."""
import ast
import importlib
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
ARGPARSE_CLIS = ("glmv_jax.rl.difficulty", "glmv_jax.data.validate", "experiments.chat", "experiments.evaluate")
ABSL_CLIS = ("experiments.aot", "experiments.run")


def words(text: str) -> str:
    return " ".join(text.split())


def docstring(name: str) -> str:
    """The module's docstring, read from its source (importing both absl CLIs would define --config twice)."""
    return ast.get_docstring(ast.parse((ROOT / (name.replace(".", "/") + ".py")).read_text()))


def check_help(name: str, shown: str) -> None:
    doc = docstring(name)
    assert doc.endswith("."), f"{name}'s docstring does not end a sentence"
    assert words(doc) in words(shown), f"{name} --help does not show its whole docstring"


@pytest.mark.parametrize("name", ARGPARSE_CLIS)
def test_argparse_help_is_the_whole_docstring(name, capsys):
    with pytest.raises(SystemExit) as exit_info:
        importlib.import_module(name).main(["--help"])
    assert exit_info.value.code == 0
    check_help(name, capsys.readouterr().out)


@pytest.mark.parametrize("name", ABSL_CLIS)
def test_absl_help_is_the_whole_docstring(name):
    done = subprocess.run([sys.executable, "-m", name, "--help"], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
    check_help(name, done.stdout)
