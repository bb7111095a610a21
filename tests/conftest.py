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


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Tiny models: one intra-op thread is faster, and far faster on a loaded shared CPU."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def tiny_llama():
    """The seeded tiny Llama and the tiny chat tokenizer, shared read-only (copy the model before changing it)."""
    from ssah_plugin.io.tiny import tiny_model, tiny_tokenizer

    return tiny_model("llama"), tiny_tokenizer()
