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


def module(name: str, **attrs) -> types.ModuleType:
    """A stand-in host module `name` holding `attrs`."""
    m = types.ModuleType(name)
    m.__dict__.update(attrs)
    return m


def put_modules(modules: dict[str, types.ModuleType], saved: dict[str, types.ModuleType | None]) -> None:
    """Put the double's `modules` in ``sys.modules``, keeping in `saved` what each name held before."""
    for name, mod in modules.items():
        saved[name] = sys.modules.get(name)
        sys.modules[name] = mod


def restore_modules(saved: dict[str, types.ModuleType | None]) -> None:
    """Undo `put_modules`: each name back to what it held (removed where it held nothing); `saved` emptied."""
    for name, old in saved.items():
        if old is None:
            sys.modules.pop(name, None)
        else:
            sys.modules[name] = old
    saved.clear()
