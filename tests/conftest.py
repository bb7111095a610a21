import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# DeepSpeed JIT-builds ops on first use: keep the cache inside the project so concurrent jobs share one build.
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(ROOT / ".torch_extensions"))
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("WANDB_DISABLED", "true")


@pytest.fixture
def tmp_out(tmp_path):
    return tmp_path
