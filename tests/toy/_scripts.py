"""Loads the toy training scripts (``scripts/toy/*.py``, not part of the package) as modules.

The scripts import their shared ``common`` module by name, as they do when run as
``python scripts/toy/<name>.py`` (Python then puts their folder first on ``sys.path``), so the
folder is put on ``sys.path`` while a script is loaded.
"""

import importlib.util
import sys
from pathlib import Path

SCRIPTS = Path(__file__).resolve().parents[2] / "scripts" / "toy"


def load_script(name: str):
    """``scripts/toy/<name>.py`` as a module (loaded once per process, as ``toy_script_<name>``)."""
    module_name = f"toy_script_{name}"
    if module_name in sys.modules:
        return sys.modules[module_name]
    spec = importlib.util.spec_from_file_location(module_name, SCRIPTS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.path.insert(0, str(SCRIPTS))
    try:
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(SCRIPTS))
    sys.modules[module_name] = module
    return module
