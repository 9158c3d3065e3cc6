"""The ``qsilk`` command line: ``python -m qsilk <command> [options]``.

Commands are listed in `COMMANDS`, one `Command` per line, and their modules are imported only
when that command runs (``qsilk --help`` imports none of them). A command module provides either

- ``add_arguments(parser)`` and ``run(args) -> int`` (the parser is built here), or
- ``run_argv(argv) -> int`` (the module parses its own arguments, e.g. the benchmark script).

To add a command, write its module and add one line to `COMMANDS` (or call `register` from code
that runs before `main`, e.g. a plugin).
"""
from __future__ import annotations

import argparse
import importlib
import importlib.util
import logging
import sys
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

from .settings import SettingsError


@dataclass(frozen=True)
class Command:
    name: str
    module: str  # dotted module name, or "path:<file relative to the repository root>"
    help: str


COMMANDS: list[Command] = [
    Command("compare", "qsilk.demo.compare", "same seeds with and without QSilk: grid with zoomed crops, heatmaps, metrics"),
    Command("bench", "path:bench/bench_core.py", "core benchmark: side-by-side cost ratios of the stabilizer"),
    Command("calibrate", "qsilk.quant.cmd_calibrate", "low-bit models: fit Q-Sched coefficients (search | paired)"),
    Command("diagnose", "qsilk.quant.cmd_diagnose", "low-bit models: per-step latent statistics, 16-bit vs low-bit"),
]

#: Where `path:` modules are looked up: the repository (or source tree) that holds the package.
REPO_ROOT = Path(__file__).resolve().parent.parent


def register(command: Command) -> None:
    """Add (or replace) a command."""
    COMMANDS[:] = [c for c in COMMANDS if c.name != command.name] + [command]


class CommandError(RuntimeError):
    """A user-facing failure (missing optional package, unreadable checkpoint, unavailable command):
    printed as one line, exit status 2, no traceback. Bad parameters raise `SettingsError`."""


class CommandUnavailable(CommandError):
    """A command's module cannot be loaded (e.g. the benchmark outside a source checkout)."""


def load_command(command: Command) -> ModuleType:
    if command.module.startswith("path:"):
        path = REPO_ROOT / command.module[len("path:"):]
        if not path.is_file():
            raise CommandUnavailable(
                f"'{command.name}' needs {path.relative_to(REPO_ROOT)} from a QSilk source checkout "
                f"(not part of an installed package); looked in {REPO_ROOT}")
        spec = importlib.util.spec_from_file_location(f"qsilk_cmd_{command.name}", path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module
        spec.loader.exec_module(module)
        return module
    return importlib.import_module(command.module)


def _run_function(module: ModuleType):
    """``run_argv(argv)`` or, for scripts that follow the benchmark's contract, ``run(argv)``."""
    fn = getattr(module, "run_argv", None)
    if fn is None and not hasattr(module, "add_arguments"):
        fn = getattr(module, "run", None)
    return fn


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="qsilk", description="QSilk latent stabilizer outside a WebUI.",
        epilog="`qsilk <command> --help` for a command's options.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="command")
    for c in COMMANDS:
        sub.add_parser(c.name, help=c.help, add_help=False)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``qsilk`` and ``python -m qsilk``; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    # Only the command name is parsed here; the command's own options are parsed by its module.
    head = []
    while argv and argv[0].startswith("-") and argv[0] not in ("-h", "--help"):
        head.append(argv.pop(0))
    if not argv or argv[0] in ("-h", "--help"):
        parser.print_help()
        return 0 if argv else 2
    name, rest = argv[0], argv[1:]
    top = parser.parse_args(head)
    logging.basicConfig(level=logging.DEBUG if top.verbose else logging.INFO, format="%(message)s")
    command = next((c for c in COMMANDS if c.name == name), None)
    if command is None:
        parser.error(f"unknown command {name!r}; choose from {', '.join(c.name for c in COMMANDS)}")
    try:
        module = load_command(command)
        fn = _run_function(module)
        if fn is not None:
            return int(fn(rest) or 0)
        sub = argparse.ArgumentParser(prog=f"qsilk {command.name}", description=command.help)
        module.add_arguments(sub)
        return int(module.run(sub.parse_args(rest)) or 0)
    except (SettingsError, CommandError) as exc:
        print(f"qsilk {command.name}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"qsilk {command.name}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
