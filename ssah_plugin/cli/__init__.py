"""``ssah-plugin`` command line. One module per subcommand in :mod:`ssah_plugin.cli`, imported lazily.

Each command module defines ``HELP`` (one line), ``EPILOG`` (an example), ``add_arguments(parser)`` and
``run(args) -> int``. ``print`` is used here and in command modules only.
"""
from __future__ import annotations

import argparse
import importlib
import logging
import sys

from ssah_plugin._version import __version__

__all__ = ["main", "COMMANDS"]

#: subcommand -> module under ssah_plugin.cli
COMMANDS = {
    "demo": "demo",
    "locate": "locate",
    "inspect": "inspect_mask",
    "ablate": "ablate",
    "verify": "verify",
    "eval": "evaluate",
    "refusals": "refusals",
}


def _load(name: str):
    return importlib.import_module(f"ssah_plugin.cli.{COMMANDS[name]}")


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ssah-plugin",
        description="Locate safety-critical units, freeze them bit-exactly during fine-tuning, verify and evaluate.",
    )
    parser.add_argument("--version", action="version", version=f"ssah-plugin {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        if only is not None and name != only:
            sub.add_parser(name, help=f"see ssah-plugin {name} --help")
            continue
        try:
            mod = _load(name)
        except ModuleNotFoundError as exc:
            if exc.name and exc.name.startswith("ssah_plugin.cli"):
                continue  # command not part of this build
            raise
        p = sub.add_parser(name, help=mod.HELP, description=mod.HELP, epilog=mod.EPILOG,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        mod.add_arguments(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    # Import only the command that runs (each pulls in torch/transformers on its own schedule).
    only = next((a for a in argv if a in COMMANDS), None)
    parser = build_parser(only)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    if not args.command:
        parser.print_help()
        return 2
    from ssah_plugin.errors import SSAHError

    try:
        return int(_load(args.command).run(args) or 0)
    except SSAHError as exc:
        print(f"ssah-plugin {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
