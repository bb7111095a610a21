"""The Axolotl plugin through Axolotl's own CLI: ``axolotl train cfg.yml`` (accelerate launcher) on a CPU.

The configs are the shipped ``integrations/axolotl/*.yml`` with the model, data, sizes and precision replaced by a
tiny Llama saved to a folder. Checks: frozen units bitwise equal to the base in the saved model (full fine-tuning) or
in the model merged with PEFT (LoRA), every other unit and the embeddings trained, a control run without the plugin
moves the frozen units (so the check can fail), a mask made for other weights stops the run before the first step,
and bad ``ssah_*`` keys are config errors in Axolotl's own config loading.

Runs in the environment built by ``scripts/integration_envs.sh`` (``envs/axolotl`` next to the checkout by default);
skipped, with the reason, wherever Axolotl is not installed. About 2 minutes on 2 CPU cores (measured 128 s; each
``axolotl train`` is ~20 s, mostly imports).
"""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

if importlib.util.find_spec("axolotl") is None:
    pytest.skip("Axolotl is not installed in this environment; build its own with `bash scripts/integration_envs.sh "
                "axolotl` (runs these tests there)", allow_module_level=True)

from .frameworks import (
    POLICY,
    check_merged_lora_run,
    check_refused_before_training,
    frozen_report,
    run_cli,
    tail,
)

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = ROOT / "integrations" / "axolotl"
STEPS = 4


def _config(name: str, tiny_run, out: Path, *, plugin: bool = True, **changes) -> Path:
    """The shipped config ``name`` for the tiny model on a CPU (plugin keys kept unless ``plugin=False``)."""
    import yaml

    cfg = yaml.safe_load((CONFIGS / name).read_text(encoding="utf-8"))
    assert cfg["plugins"] == ["ssah_plugin.integrations.axolotl.SSAHPlugin"], "the shipped config lists the plugin"
    assert cfg["ssah_policy"] == POLICY
    cfg.update(
        base_model=str(tiny_run.base),
        datasets=[{"path": str(tiny_run.chat), "ds_type": "json", "type": "chat_template"}],
        dataset_prepared_path=str(out / "prepared"), output_dir=str(out / "model"),
        sequence_len=128, micro_batch_size=2, gradient_accumulation_steps=2, max_steps=STEPS, num_epochs=1,
        learning_rate=1e-2, lr_scheduler="constant", bf16=False, fp16=False, tf32=False,
        gradient_checkpointing=False, logging_steps=1, save_strategy="no", dataset_num_proc=1, seed=0,
        ssah_mask=str(tiny_run.mask),
    )
    cfg.pop("warmup_ratio", None)
    cfg.update(changes)
    if not plugin:
        for key in ("plugins", "ssah_mask", "ssah_policy"):
            cfg.pop(key, None)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "cfg.yml"
    path.write_text(yaml.safe_dump(cfg), encoding="utf-8")
    return path


def _train(cfg: Path):
    axolotl = str(Path(sys.executable).parent / "axolotl")
    return run_cli([axolotl, "train", str(cfg)], cwd=cfg.parent, log=cfg.parent / "train.log")


def test_full_finetuning_keeps_frozen_units_bitexact(tiny_run, tmp_path):
    out = tmp_path / "full"
    proc = _train(_config("sft-ssah.yml", tiny_run, out))
    assert proc.returncode == 0, tail(proc.stdout)
    assert "ssah/frozen_units" in proc.stdout  # the callback's first log record reached Axolotl's logs
    rep = frozen_report(tiny_run.base, out / "model", tiny_run.mask)
    assert rep.frozen_units > 0 and rep.frozen_elements > 0
    assert rep.frozen_changed == 0, f"{rep.frozen_changed} of {rep.frozen_elements} frozen weights changed"
    assert rep.trainable_units_moved == rep.trainable_units, rep
    assert "model.embed_tokens.weight" in rep.other_tensors_changed


def test_control_without_plugin_moves_frozen_units(tiny_run, tmp_path):
    """The same run without the plugin changes the frozen units (weight decay 0.1 alone would): the check can fail."""
    out = tmp_path / "control"
    proc = _train(_config("sft-ssah.yml", tiny_run, out, plugin=False))
    assert proc.returncode == 0, tail(proc.stdout)
    assert "ssah/frozen_units" not in proc.stdout
    rep = frozen_report(tiny_run.base, out / "model", tiny_run.mask)
    assert rep.frozen_changed > rep.frozen_elements // 2


def test_lora_merged_model_keeps_frozen_units_bitexact(tiny_run, tmp_path):
    out = tmp_path / "lora"
    # Axolotl 0.19 turns on its fused LoRA kernels for every LoRA run (check_auto_enable_lora_kernels in
    # axolotl/utils/schemas/config.py), and they are CUDA-only: axolotl/kernels/swiglu.py:119 allocates with
    # device="cuda" ("Torch not compiled with CUDA enabled" on CPU). Off here; with them on (GPU) this is untested.
    kernels_off = {k: False for k in ("lora_mlp_kernel", "lora_qkv_kernel", "lora_o_kernel", "lora_embedding_kernel")}
    proc = _train(_config("lora-ssah.yml", tiny_run, out, lora_dropout=0.0, **kernels_off))
    check_merged_lora_run(tiny_run, proc, out)


def test_mask_for_other_weights_refused_before_training(tiny_run, tmp_path):
    out = tmp_path / "foreign"
    proc = _train(_config("sft-ssah.yml", tiny_run, out, ssah_mask=str(tiny_run.foreign_mask)))
    check_refused_before_training(proc, out)


@pytest.mark.parametrize("changes, message", [
    ({"ssah_mask": None}, "`ssah_mask:` is not set"),
    ({"ssah_mask": "missing.safetensors"}, "does not exist"),
    ({"ssah_policy": "no-such-policy"}, "unknown policy 'no-such-policy'"),
], ids=["no-mask", "missing-file", "unknown-policy"])
def test_bad_plugin_keys_are_config_errors(tiny_run, tmp_path, changes, message):
    """Axolotl's own config loading (``load_cfg``: before data, model or trainer) rejects them."""
    from axolotl.cli.config import load_cfg

    out = tmp_path / "cfg"
    cfg = _config("sft-ssah.yml", tiny_run, out, **changes)
    if changes.get("ssah_mask", "") is None:
        import yaml

        data = yaml.safe_load(cfg.read_text())
        data.pop("ssah_mask")
        cfg.write_text(yaml.safe_dump(data))
    with pytest.raises(Exception, match="ssah") as info:
        load_cfg(str(cfg))
    assert message in str(info.value)


def test_good_config_loads_with_plugin_keys(tiny_run, tmp_path):
    from axolotl.cli.config import load_cfg

    cfg = load_cfg(str(_config("sft-ssah.yml", tiny_run, tmp_path / "ok")))
    assert cfg.ssah_mask == str(tiny_run.mask) and cfg.ssah_policy == POLICY
