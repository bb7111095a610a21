"""The public surface: every name in __all__ resolves, and importing the package stays light."""
import subprocess
import sys

import ssah_plugin


def test_all_names_resolve():
    import importlib
    import types

    importlib.import_module("ssah_plugin.locate.runner")  # binds the submodule on the package, as any user import would

    for name in ssah_plugin.__all__:
        obj = getattr(ssah_plugin, name)
        assert obj is not None and not isinstance(obj, types.ModuleType), name


def test_import_does_not_pull_frameworks():
    code = ("import sys, ssah_plugin; heavy = [m for m in ('transformers', 'deepspeed', 'peft', 'trl') "
            "if m in sys.modules]; print(','.join(heavy))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == ""


def test_cli_help_lists_every_command(capsys):
    from ssah_plugin.cli import COMMANDS, main

    assert main([]) == 2
    text = capsys.readouterr().out
    for name in COMMANDS:
        assert name in text
