"""LLaMA-Factory's own training path (``run_exp`` -> ``run_sft``) with the callback, through the launcher
``python -m ssah_plugin.integrations.llamafactory cfg.yaml`` on a CPU.

The configs are the shipped ``integrations/llamafactory/*.yaml`` with the model, data, sizes and precision replaced by
a tiny Llama saved to a folder and a local ``dataset_info.json``. Checks: frozen units bitwise equal to the base in
the saved model (full fine-tuning) or in the model merged with PEFT (LoRA), every other unit and the embeddings
trained, a control run with ``llamafactory-cli train`` (no plugin) moves the frozen units, a mask made for other
weights stops the run before the first step, ``llamafactory-cli train`` refuses a config with ``ssah_*`` keys, and a
missing mask or unknown policy is an error before LLaMA-Factory loads anything.

Runs in the environment built by ``scripts/integration_envs.sh`` (``envs/llamafactory`` next to the checkout by
default); skipped, with the reason, wherever LLaMA-Factory is not installed. About 1 minute on 2 CPU cores (measured
49 s).
"""
from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

if importlib.util.find_spec("llamafactory") is None:
    pytest.skip("LLaMA-Factory is not installed in this environment; build its own with `bash "
                "scripts/integration_envs.sh llamafactory` (runs these tests there)", allow_module_level=True)

from .frameworks import (
    POLICY,
    check_merged_lora_run,
    check_refused_before_training,
    frozen_report,
    run_cli,
    tail,
)

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = ROOT / "integrations" / "llamafactory"
STEPS = 4


def _dataset_dir(tiny_run) -> Path:
    d = tiny_run.root / "lf_data"
    d.mkdir(exist_ok=True)
    info = {"tiny_chat": {"file_name": str(tiny_run.chat), "formatting": "sharegpt", "columns": {"messages": "messages"},
                          "tags": {"role_tag": "role", "content_tag": "content", "user_tag": "user",
                                   "assistant_tag": "assistant"}}}
    (d / "dataset_info.json").write_text(json.dumps(info), encoding="utf-8")
    return d


def _config(name: str, tiny_run, out: Path, *, plugin: bool = True, **changes) -> Path:
    import yaml

    cfg = yaml.safe_load((CONFIGS / name).read_text(encoding="utf-8"))
    assert cfg["ssah_policy"] == POLICY and "ssah_mask" in cfg
    cfg.update(
        model_name_or_path=str(tiny_run.base), dataset="tiny_chat", dataset_dir=str(_dataset_dir(tiny_run)),
        template="chatml", cutoff_len=128, preprocessing_num_workers=1, overwrite_cache=True,
        output_dir=str(out / "model"), overwrite_output_dir=True, per_device_train_batch_size=2,
        gradient_accumulation_steps=2, max_steps=STEPS, learning_rate=1e-2, lr_scheduler_type="constant",
        logging_steps=1, save_strategy="no", bf16=False, use_cpu=True, seed=0, ssah_mask=str(tiny_run.mask),
    )
    cfg.pop("warmup_ratio", None)
    cfg.update(changes)
    if not plugin:
        for key in ("ssah_mask", "ssah_policy"):
            cfg.pop(key, None)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg), encoding="utf-8")
    return path


def _launch(cfg: Path):
    cmd = [sys.executable, "-m", "ssah_plugin.integrations.llamafactory", str(cfg)]
    return run_cli(cmd, cwd=cfg.parent, log=cfg.parent / "train.log")


def _cli(cfg: Path):
    cli = str(Path(sys.executable).parent / "llamafactory-cli")
    return run_cli([cli, "train", str(cfg)], cwd=cfg.parent, log=cfg.parent / "train.log")


def test_full_finetuning_keeps_frozen_units_bitexact(tiny_run, tmp_path):
    out = tmp_path / "full"
    proc = _launch(_config("sft-ssah.yaml", tiny_run, out))
    assert proc.returncode == 0, tail(proc.stdout)
    assert "ssah-plugin: freezing" in proc.stdout and "ssah/frozen_units" in proc.stdout
    rep = frozen_report(tiny_run.base, out / "model", tiny_run.mask)
    assert rep.frozen_units > 0 and rep.frozen_elements > 0
    assert rep.frozen_changed == 0, f"{rep.frozen_changed} of {rep.frozen_elements} frozen weights changed"
    assert rep.trainable_units_moved == rep.trainable_units, rep
    assert "model.embed_tokens.weight" in rep.other_tensors_changed


def test_control_without_plugin_moves_frozen_units(tiny_run, tmp_path):
    out = tmp_path / "control"
    proc = _cli(_config("sft-ssah.yaml", tiny_run, out, plugin=False))
    assert proc.returncode == 0, tail(proc.stdout)
    rep = frozen_report(tiny_run.base, out / "model", tiny_run.mask)
    assert rep.frozen_changed > rep.frozen_elements // 2


def test_lora_merged_model_keeps_frozen_units_bitexact(tiny_run, tmp_path):
    out = tmp_path / "lora"
    proc = _launch(_config("lora-ssah.yaml", tiny_run, out, lora_dropout=0.0))
    check_merged_lora_run(tiny_run, proc, out)


def test_mask_for_other_weights_refused_before_training(tiny_run, tmp_path):
    out = tmp_path / "foreign"
    proc = _launch(_config("sft-ssah.yaml", tiny_run, out, ssah_mask=str(tiny_run.foreign_mask)))
    check_refused_before_training(proc, out)


def test_llamafactory_cli_refuses_ssah_keys(tiny_run, tmp_path):
    """A config meant for the launcher cannot train unprotected through ``llamafactory-cli train`` by mistake."""
    out = tmp_path / "cli"
    proc = _cli(_config("sft-ssah.yaml", tiny_run, out))
    assert proc.returncode != 0
    assert "Some keys are not used by the HfArgumentParser" in proc.stdout and "ssah_mask" in proc.stdout
    assert not (out / "model" / "model.safetensors").exists()


@pytest.mark.parametrize("changes, error, message", [
    ({"ssah_mask": None}, ValueError, "no `ssah_mask:`"),
    ({"ssah_mask": "missing.safetensors"}, ValueError, "does not exist"),
    ({"ssah_policy": "no-such-policy"}, ValueError, "unknown policy 'no-such-policy'"),
    ({"ssah_check_fingerprint": "yes"}, ValueError, "must be true or false"),
], ids=["no-mask", "missing-file", "unknown-policy", "bad-flag"])
def test_bad_ssah_keys_fail_before_llamafactory_runs(tiny_run, tmp_path, changes, error, message, monkeypatch):
    from llamafactory.train import tuner

    from ssah_plugin.integrations import llamafactory as launcher

    def must_not_run(*args, **kwargs):
        raise AssertionError("run_exp was reached")

    monkeypatch.setattr(tuner, "run_exp", must_not_run)
    cfg = launcher.load_config(_config("sft-ssah.yaml", tiny_run, tmp_path / "cfg"))
    cfg.update({k: v for k, v in changes.items() if v is not None})
    for k in [k for k, v in changes.items() if v is None]:
        cfg.pop(k)
    with pytest.raises(error) as info:
        launcher.run(cfg)
    assert message in str(info.value)


def test_launcher_passes_overrides_and_strips_ssah_keys(tiny_run, tmp_path, monkeypatch):
    from llamafactory.train import tuner

    from ssah_plugin import SSAHCallback
    from ssah_plugin.integrations import llamafactory as launcher

    seen = {}
    monkeypatch.setattr(tuner, "run_exp", lambda args=None, callbacks=None: seen.update(args=args, callbacks=callbacks))
    cfg = _config("sft-ssah.yaml", tiny_run, tmp_path / "cfg")
    assert launcher.main(["train", str(cfg), "max_steps=2", "ssah_policy=scu"]) == 0
    assert seen["args"]["max_steps"] == 2 and not any(k.startswith("ssah_") for k in seen["args"])
    (cb,) = seen["callbacks"]
    assert isinstance(cb, SSAHCallback) and cb.policy == "scu"
