"""Every script in examples/ runs on the embedded tiny default and reports exact freezing (exit code 0)."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
SCRIPTS = sorted(p.name for p in EXAMPLES.glob("*.py") if not p.name.startswith("_"))


def test_examples_found():
    assert {"trl_sft.py", "trl_dpo.py", "custom_loop.py"} <= set(SCRIPTS)


@pytest.mark.parametrize("script", SCRIPTS)
def test_example_runs(script, tmp_path):
    env = dict(os.environ, PYTHONPATH=str(EXAMPLES))
    proc = subprocess.run([sys.executable, str(EXAMPLES / script), "--out", str(tmp_path), "--steps", "3"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
