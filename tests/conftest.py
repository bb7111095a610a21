import os
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# DeepSpeed JIT-builds ops on first use: keep the cache inside the project so concurrent jobs share one build.
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(ROOT / ".torch_extensions"))
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("WANDB_DISABLED", "true")

# Shared fixtures (torch_device, deterministic, tiny_llama, one intra-op thread) and the cuda / multi_gpu
# markers: see ssah_plugin/testing/fixtures.py.
pytest_plugins = ["ssah_plugin.testing.fixtures"]
