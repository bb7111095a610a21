"""The suite's pytest plugin: devices, determinism, shared tiny models, and the ``cuda`` / ``multi_gpu`` markers.

Loaded by ``tests/conftest.py`` with ``pytest_plugins = ["ssah_plugin.testing.fixtures"]`` (this module imports
pytest; nothing else in the package does).

Devices: a test that takes the ``torch_device`` fixture runs once per device in ``SSAH_TEST_DEVICE`` (a comma list
such as ``cpu``, ``cuda``, ``cuda:1`` or ``cpu,cuda``). Unset (or ``auto``): ``cpu``, plus ``cuda`` when
``torch.cuda.is_available()``. Asking for a CUDA device that is not there is a usage error (the run stops) rather
than a silent skip, so a GPU check cannot pass without having run on the GPU. Every CUDA parametrisation carries the
``cuda`` marker, so ``-m cuda`` selects exactly the GPU runs and ``-m "not cuda"`` the CPU ones.

Markers: ``cuda`` (skipped, with the reason, when CUDA is unavailable) and ``multi_gpu`` (skipped with fewer than two
CUDA devices).
"""
from __future__ import annotations

import os

import pytest
import torch

# cuBLAS needs a fixed workspace for deterministic matmuls; it is read when cuBLAS starts, so set it before any test
# touches CUDA (pytest imports this plugin while it loads conftest.py, before collecting the tests).
os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")

ENV_DEVICE = "SSAH_TEST_DEVICE"

_NO_CUDA = "needs CUDA: torch.cuda.is_available() is False on this machine"


def selected_devices(value: str | None = None) -> list[str]:
    """The devices ``torch_device`` runs on, from ``value`` (default: the ``SSAH_TEST_DEVICE`` variable)."""
    value = os.environ.get(ENV_DEVICE, "") if value is None else value
    names = [v.strip() for v in value.split(",") if v.strip()]
    if not names or names == ["auto"]:
        return ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    for name in names:
        try:
            dev = torch.device(name)
        except RuntimeError as e:
            raise pytest.UsageError(f"{ENV_DEVICE}={value!r}: {name!r} is not a torch device ({e})") from None
        if dev.type not in ("cpu", "cuda"):
            raise pytest.UsageError(f"{ENV_DEVICE}={value!r}: only cpu and cuda devices are supported, got {name!r}")
        if dev.type == "cuda":
            if not torch.cuda.is_available():
                raise pytest.UsageError(f"{ENV_DEVICE}={value!r} asks for {name}, but {_NO_CUDA}")
            if dev.index is not None and dev.index >= torch.cuda.device_count():
                raise pytest.UsageError(f"{ENV_DEVICE}={value!r}: {name} does not exist "
                                        f"({torch.cuda.device_count()} CUDA device(s))")
    return names



def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "cuda: needs a CUDA device (skipped, with the reason, without one)")
    config.addinivalue_line("markers", "multi_gpu: needs two or more CUDA devices (skipped otherwise)")
    config._ssah_devices = selected_devices()  # validate SSAH_TEST_DEVICE once, before collection


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "torch_device" in metafunc.fixturenames:
        names = getattr(metafunc.config, "_ssah_devices", None) or selected_devices()
        params = [pytest.param(n, id=n, marks=[pytest.mark.cuda] if n.startswith("cuda") else [])
                  for n in names]
        metafunc.parametrize("torch_device", params, indirect=True)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    n_cuda = torch.cuda.device_count() if torch.cuda.is_available() else 0
    for item in items:
        if n_cuda == 0 and item.get_closest_marker("cuda") is not None:
            item.add_marker(pytest.mark.skip(reason=_NO_CUDA))
        elif n_cuda < 2 and item.get_closest_marker("multi_gpu") is not None:
            item.add_marker(pytest.mark.skip(reason=f"needs 2 or more CUDA devices, this machine has {n_cuda}"))


@pytest.fixture
def torch_device(request) -> torch.device:
    """The device this parametrisation runs on (see the module docstring); CUDA tests start on that device."""
    dev = torch.device(getattr(request, "param", "cpu"))
    if dev.type == "cuda":
        torch.cuda.set_device(dev.index or 0)
    return dev


@pytest.fixture
def deterministic():
    """``torch.use_deterministic_algorithms(True, warn_only=True)`` for one test (CPU ops already are).

    Comparisons of two training runs (the plugin against a hand-written reference) are only bitwise on CUDA when
    no kernel accumulates with atomics; ``warn_only`` names any op that cannot comply instead of failing on it.
    """
    was, was_warn = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    cudnn = torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    yield
    torch.use_deterministic_algorithms(was, warn_only=was_warn)
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = cudnn


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Tiny models: one intra-op thread is faster, and far faster on a loaded shared CPU."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def tiny_llama():
    """The seeded tiny Llama and the tiny chat tokenizer, shared read-only (copy the model before changing it)."""
    from ssah_plugin.io.tiny import tiny_model, tiny_tokenizer

    return tiny_model("llama"), tiny_tokenizer()
