"""In an environment without Axolotl / LLaMA-Factory (the main suite's): the integration modules name what to install.

Each test skips where its framework is installed (there the framework's own test file runs instead).
"""
from __future__ import annotations

import importlib
import importlib.util
import subprocess
import sys

import pytest

from ssah_plugin.errors import MissingExtraError


@pytest.mark.skipif(importlib.util.find_spec("axolotl") is not None,
                    reason="Axolotl is installed here: test_axolotl.py tests the plugin")
def test_axolotl_plugin_without_axolotl_names_the_extra(monkeypatch):
    monkeypatch.delitem(sys.modules, "ssah_plugin.integrations.axolotl", raising=False)
    with pytest.raises(MissingExtraError, match=r"needs the 'axolotl' package.*pip install 'ssah-plugin\[axolotl\]'"):
        importlib.import_module("ssah_plugin.integrations.axolotl")


@pytest.mark.skipif(importlib.util.find_spec("llamafactory") is not None,
                    reason="LLaMA-Factory is installed here: test_llamafactory.py tests the launcher")
def test_llamafactory_launcher_without_llamafactory_names_the_extra(tmp_path):
    from ssah_plugin.integrations import (
        llamafactory as launcher,  # importable: the framework is imported lazily
    )

    cfg = tmp_path / "train.yaml"
    cfg.write_text("model_name_or_path: x\nssah_mask: mask.safetensors\n", encoding="utf-8")
    with pytest.raises(MissingExtraError, match=r"pip install 'ssah-plugin\[llamafactory\]'"):
        launcher.main([str(cfg)])
    with pytest.raises(MissingExtraError, match=r"pip install 'ssah-plugin\[llamafactory\]'"):
        launcher.run({"ssah_mask": "mask.safetensors"})


def test_importing_the_integrations_imports_no_framework():
    """``ssah_plugin.integrations`` and the LLaMA-Factory launcher module import no framework until they run."""
    code = ("import sys, ssah_plugin, ssah_plugin.integrations, ssah_plugin.integrations.llamafactory; "
            "print(sorted(m for m in ('axolotl', 'llamafactory', 'omegaconf') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
