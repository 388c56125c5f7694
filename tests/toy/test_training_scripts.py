"""The lab scripts that trained the shipped toy models (``scripts/toy/``) still start.

They live outside the package; see ``scripts/toy/README.md``. Their bit-identical training is
checked by hand when they change (a few steps before and after, sha256 of the weights).
"""

import ast
import subprocess
import sys

import pytest

from tests.toy._scripts import SCRIPTS, load_script

SUBCOMMANDS = {
    "train_t2i": {"clip", "vae", "t2i", "eval-t2i", "eval-clip"},
    "train_video": {"video-vae", "t2v", "i2v", "eval-t2v", "eval-i2v"},
}


@pytest.mark.parametrize("name", sorted(SUBCOMMANDS))
def test_script_help_runs(name):
    out = subprocess.run(
        [sys.executable, str(SCRIPTS / f"{name}.py"), "--help"], capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    assert f"python scripts/toy/{name}.py" in out.stdout
    for kind in SUBCOMMANDS[name]:
        assert kind in out.stdout


@pytest.mark.parametrize("name", sorted(SUBCOMMANDS))
def test_script_loads_and_offers_its_subcommands(name):
    parser = load_script(name)._parser()
    sub = next(a for a in parser._actions if a.dest == "kind")
    assert set(sub.choices) == SUBCOMMANDS[name]


def test_scripts_import_common_only():
    """The import goes one way: each script imports ``common``; neither imports the other."""
    for name in SUBCOMMANDS:
        tree = ast.parse((SCRIPTS / f"{name}.py").read_text())
        imported = {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
        imported |= {a.name for node in ast.walk(tree) if isinstance(node, ast.Import) for a in node.names}
        assert "common" in imported
        assert not imported & {*SUBCOMMANDS, "visalign.toy.train", "visalign.toy.train_video"}
