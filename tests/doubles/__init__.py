"""Test doubles of the WebUI hosts (no WebUI is available in CI).

Each double's docstring names the host source and commit it mirrors. They are written from the
research notes and a reading of the hosts' source; no host code is copied.
"""

import importlib.util
import os
import sys
import types


def load_script(root: str) -> types.ModuleType:
    """Load ``scripts/qsilk.py`` the way ``modules/script_loading.load_module`` does (A1111 v1.10.1;
    Forge keeps it): module name = file basename, extension root prepended to ``sys.path`` only
    while the file executes."""
    path = os.path.join(root, "scripts", "qsilk.py")
    saved = list(sys.path)
    sys.path.insert(0, root)
    try:
        spec = importlib.util.spec_from_file_location(os.path.basename(path), path)
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
    finally:
        sys.path[:] = saved
    return mod
