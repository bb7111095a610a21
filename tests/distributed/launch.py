"""Launch real 2-rank jobs (torchrun) and read the ranks' result markers.

On a machine with two or more CUDA devices the ranks use NCCL, one GPU each (``DS_ACCELERATOR=cuda``); otherwise
gloo on CPU (``DS_ACCELERATOR=cpu``). The workers read the choice from ``SSAH_DIST_BACKEND``; every marker records
the backend and device its rank used, so a GPU run can be told from a CPU one (``test_zero.py`` checks it under the
``multi_gpu`` marker).
"""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
WORKER = Path(__file__).with_name("worker.py")
NPROC = 2


def free_port() -> int:
    """A TCP port nobody listens on now (one per launch, so concurrent tests do not collide)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def backend() -> str:
    """``"nccl"`` when every rank can have its own CUDA device, else ``"gloo"`` (CPU)."""
    return "nccl" if torch.cuda.is_available() and torch.cuda.device_count() >= NPROC else "gloo"


def job_env() -> dict[str, str]:
    env = dict(os.environ)
    env.setdefault("TORCH_EXTENSIONS_DIR", str(ROOT / ".torch_extensions"))  # one JIT build shared by all ranks
    chosen = backend()
    env.update(SSAH_DIST_BACKEND=chosen, DS_ACCELERATOR="cuda" if chosen == "nccl" else "cpu",
               HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", WANDB_DISABLED="true", OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep))
    return env


@dataclass
class Job:
    out_dir: Path
    returncode: int
    log: str

    def marker(self, scenario: str, rank: int) -> dict:
        path = self.out_dir / f"{scenario}.rank{rank}.json"
        if not path.exists():
            raise AssertionError(f"rank {rank} wrote no marker for {scenario} (exit {self.returncode}); log tail:\n"
                                 + self.log[-3000:])
        return json.loads(path.read_text())

    def markers(self, scenario: str) -> list[dict]:
        return [self.marker(scenario, r) for r in range(NPROC)]


def launch(out_dir: Path, scenarios: list[str], *, timeout: float = 600, worker: Path = WORKER) -> Job:
    """Run ``worker`` (default ``worker.py``) on ``NPROC`` ranks over ``scenarios`` (in order); never raises on the
    exit code."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(NPROC), "--master_addr",
           "127.0.0.1", "--master_port", str(free_port()), str(worker), str(out_dir), *scenarios]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=job_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        log, _ = proc.communicate(timeout=timeout)
        code = proc.returncode
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # the launcher and its ranks: our own process group only
        log, _ = proc.communicate()
        code, log = -1, f"timed out after {timeout}s\n{log}"
    (out_dir / "launch.log").write_text(log)
    return Job(out_dir, code, log)
