"""LLaMA-Factory: its own training entry point (``run_exp``) with :class:`~ssah_plugin.SSAHCallback` added.

LLaMA-Factory has no plugin system, but ``llamafactory.train.tuner.run_exp(args, callbacks=[...])`` hands extra
callbacks to the Trainer it builds. The launcher here reads the usual LLaMA-Factory YAML plus three keys of its own,
removes them, and calls ``run_exp`` (ready config: ``integrations/llamafactory/sft-ssah.yaml``)::

    python -m ssah_plugin.integrations.llamafactory train.yaml [key=value ...]      # instead of llamafactory-cli train
    torchrun --nproc_per_node 4 -m ssah_plugin.integrations.llamafactory train.yaml  # several GPUs / ranks

    # in train.yaml, next to model_name_or_path, dataset, ...:
    ssah_mask: mask.safetensors      # from `ssah-plugin locate` (path relative to where the command runs)
    ssah_policy: scu+cu6             # optional; default: the mask's own default policy
    ssah_check_fingerprint: true     # optional

From Python it is one argument: ``run_exp(args, callbacks=[SSAHCallback("mask.safetensors", policy="scu+cu6")])``.

``llamafactory-cli train`` on a YAML with these keys stops at argument parsing ("Some keys are not used by the
HfArgumentParser"), so a config meant for the launcher never trains unprotected by mistake (unless
``ALLOW_EXTRA_ARGS=1`` is set, which makes LLaMA-Factory ignore unknown keys).

When each part runs (LLaMA-Factory 0.9.5):

* :func:`main`, before LLaMA-Factory parses anything: reads the YAML (and ``key=value`` overrides, as
  ``llamafactory-cli`` does), builds the callback, which reads the mask file and checks the policy: a missing,
  corrupt or unknown-policy mask stops here, before any model or data is loaded.
* ``run_exp`` -> ``run_sft`` / ``run_dpo`` / ...: LLaMA-Factory loads the tokenizer, data and model (and its LoRA
  adapter) and passes the callback to the Trainer's constructor, whose ``on_init_end`` refuses a mask made for another
  model. Then the callback works as in any Trainer: base-value check and gradient hooks at ``on_train_begin``, frozen
  gradients zeroed during ``backward()`` (before clipping), frozen slices written back bitwise at
  ``on_optimizer_step`` (after ``optimizer.step()``, before the scheduler and ``zero_grad()``).

LLaMA-Factory's own multi-device launch (``llamafactory-cli train`` with several GPUs, or ``FORCE_TORCHRUN=1``)
restarts its own ``launcher.py`` under torchrun, without extra callbacks: launch this module with ``torchrun``
instead, as above.
"""
from __future__ import annotations

import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ssah_plugin.errors import MissingExtraError

__all__ = ["SSAH_KEYS", "load_config", "main", "run", "split_config"]

logger = logging.getLogger(__name__)

#: The keys this launcher reads (and removes before LLaMA-Factory parses the rest).
SSAH_KEYS = ("ssah_mask", "ssah_policy", "ssah_check_fingerprint")

_PURPOSE = "ssah_plugin.integrations.llamafactory (LLaMA-Factory with SSAHCallback)"


def _require_llamafactory():
    try:
        from llamafactory.train.tuner import run_exp
    except ImportError as exc:
        raise MissingExtraError("llamafactory", "llamafactory", _PURPOSE) from exc
    return run_exp


def load_config(path: str | Path, overrides: Sequence[str] = ()) -> dict[str, Any]:
    """Read a LLaMA-Factory YAML / JSON config with ``key=value`` overrides, the way ``llamafactory-cli`` does."""
    try:
        from omegaconf import OmegaConf  # a dependency of LLaMA-Factory
    except ImportError as exc:
        raise MissingExtraError("omegaconf", "llamafactory", _PURPOSE) from exc
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"LLaMA-Factory config {str(path)!r} does not exist")
    if path.suffix == ".json":
        import json

        base = OmegaConf.create(json.loads(path.read_text(encoding="utf-8")))
    elif path.suffix in (".yaml", ".yml"):
        base = OmegaConf.load(path.absolute())
    else:
        raise ValueError(f"LLaMA-Factory config {str(path)!r}: expected a .yaml, .yml or .json file")
    merged = OmegaConf.to_container(OmegaConf.merge(base, OmegaConf.from_cli(list(overrides))))
    if not isinstance(merged, dict):
        raise TypeError(f"LLaMA-Factory config {str(path)!r} is not a mapping of arguments")
    return merged


def split_config(config: dict[str, Any]):
    """``(llamafactory_args, callback)``: the config without the ``ssah_*`` keys, and the callback they describe.

    Building the callback reads the mask file and checks the policy (errors name the key). Raises ``ValueError`` when
    ``ssah_mask`` is missing: this launcher exists to add the callback, so a config without one is a mistake.
    """
    from ssah_plugin import SSAHCallback

    args = {k: v for k, v in config.items() if k not in SSAH_KEYS}
    mask = config.get("ssah_mask")
    if not mask:
        raise ValueError("the config has no `ssah_mask:` (the mask file from `ssah-plugin locate`); add it, or train "
                         "with `llamafactory-cli train` if you do not want frozen units")
    policy = config.get("ssah_policy") or None
    check = config.get("ssah_check_fingerprint")
    if check is not None and not isinstance(check, bool):
        raise ValueError(f"ssah_check_fingerprint must be true or false, got {check!r}")
    callback = SSAHCallback(str(mask), policy=policy, check_fingerprint=True if check is None else check)
    return args, callback


def run(config: dict[str, Any], extra_callbacks: Sequence[Any] = ()) -> None:
    """Train with LLaMA-Factory's ``run_exp`` on ``config`` (a dict with the ``ssah_*`` keys) plus the callback."""
    run_exp = _require_llamafactory()
    args, callback = split_config(config)
    logger.info("ssah-plugin: LLaMA-Factory run_exp with SSAHCallback(%r, policy=%r)", config["ssah_mask"],
                callback.policy)
    run_exp(args=args, callbacks=[callback, *extra_callbacks])


def _show_progress_logs() -> None:
    """Print ssah-plugin's INFO lines (what is frozen) next to LLaMA-Factory's, unless logging is configured."""
    log = logging.getLogger("ssah_plugin")
    if not log.handlers and not logging.getLogger().handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("[%(levelname)s|%(name)s] %(message)s"))
        log.addHandler(handler)
        log.setLevel(logging.INFO)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m ssah_plugin.integrations.llamafactory [train] CONFIG.yaml [key=value ...]``."""
    import argparse

    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["train"]:  # accept `... train cfg.yaml`, like llamafactory-cli
        argv = argv[1:]
    parser = argparse.ArgumentParser(
        prog="python -m ssah_plugin.integrations.llamafactory",
        description="LLaMA-Factory training (llamafactory.train.tuner.run_exp) with SSAHCallback, configured by the "
                    "ssah_mask / ssah_policy / ssah_check_fingerprint keys of the same config file")
    parser.add_argument("config", help="LLaMA-Factory training config (.yaml, .yml or .json) with ssah_mask")
    parser.add_argument("overrides", nargs="*", help="key=value overrides, as for llamafactory-cli train")
    ns = parser.parse_args(argv)
    _require_llamafactory()
    _show_progress_logs()
    run(load_config(ns.config, ns.overrides))
    return 0


if __name__ == "__main__":
    sys.exit(main())
