"""The whole pipeline, small: locate -> fine-tune with SSAHCallback -> verify -> eval (checks plumbing, not science).

A plain fine-tune of the same model (no callback) is the control: verify must flag it, and eval must report all
three checkpoints side by side.
"""
import json

import pytest
import transformers

from ssah_plugin.cli import main
from ssah_plugin.data.eval_sets import load_benign
from ssah_plugin.data.rows import sft_examples
from ssah_plugin.io.tiny import tiny_model, tiny_tokenizer
from ssah_plugin.locate import LocateConfig, locate

SHARD = "100KB"


def fine_tune(model, tok, out_dir, callbacks):
    args = transformers.TrainingArguments(
        output_dir=str(out_dir / "trainer"), max_steps=3, per_device_train_batch_size=2, learning_rate=1e-2,
        weight_decay=0.1, use_cpu=True, report_to=[], save_strategy="no", logging_strategy="no",
        disable_tqdm=True, seed=0,
    )
    data = sft_examples(tok, load_benign("benign:train", limit=6), max_length=128, drop_unlabelled=False)
    collate = transformers.DataCollatorForSeq2Seq(tok, padding=True, label_pad_token_id=-100)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=data, data_collator=collate,
                                   callbacks=callbacks)
    trainer.train()
    model.save_pretrained(out_dir, max_shard_size=SHARD)
    tok.save_pretrained(out_dir)
    return model


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    from ssah_plugin import SSAHCallback

    root = tmp_path_factory.mktemp("pipeline")
    tok = tiny_tokenizer()
    base = tiny_model("llama")
    base.save_pretrained(root / "base", max_shard_size=SHARD)
    tok.save_pretrained(root / "base")
    cfg = LocateConfig(max_samples=8, batch_size=4, max_length=128, progress=False)
    mask = locate(base, tok, config=cfg)
    mask.save(root / "mask.safetensors")
    fine_tune(tiny_model("llama"), tok, root / "frozen", [SSAHCallback(str(root / "mask.safetensors"))])
    fine_tune(tiny_model("llama"), tok, root / "plain", [])
    return root, mask


def test_locate_gives_classes_and_a_default_policy(pipeline):
    _, mask = pipeline
    assert mask.classes is not None and mask.default_policy
    assert 0 < mask.frozen_fraction() < 1


def test_verify_passes_frozen_run_and_flags_plain_run(pipeline, capsys):
    root, _ = pipeline
    common = ["verify", "--base", str(root / "base"), "--mask", str(root / "mask.safetensors"), "--json",
              "--no-progress"]
    assert main(common + ["--tuned", str(root / "frozen")]) == 0
    ok = json.loads(capsys.readouterr().out)
    assert ok["total"]["frozen_units"] > 0 and ok["total"]["changed_units"] == 0
    assert ok["total"]["trainable_changed_units"] > 0  # training did move the other units
    assert set(ok["per_class"]) >= {"SCU", "CU"}
    assert main(common + ["--tuned", str(root / "plain")]) == 1
    bad = json.loads(capsys.readouterr().out)
    assert bad["total"]["violating_units"] > 0 and bad["per_class"]["SCU"]["changed_units"] > 0


def test_eval_reports_three_checkpoints_side_by_side(pipeline, capsys):
    root, _ = pipeline
    out = root / "eval"
    args = ["eval", "--limit", "2", "--max-new-tokens", "8", "--batch-size", "2", "--out", str(out), "--no-progress",
            "--save-responses"]
    for name in ("base", "frozen", "plain"):
        args += ["--model", str(root / name), "--name", name]
    assert main(args) == 0
    captured = capsys.readouterr()
    rows = json.loads((out / "eval.json").read_text())
    assert [r["name"] for r in rows] == ["base", "frozen", "plain"]
    for r in rows:
        assert r["n_harmful"] == 2 and r["n_benign"] == 2 and r["benign_loss"] > 0
        assert "details" not in r and "responses" not in json.dumps(r)
    assert (out / "eval.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| frozen |" in (out / "eval.md").read_text()
    saved = [json.loads(line) for line in (out / "responses.jsonl").read_text().splitlines()]
    assert len(saved) == 6
    # harmful prompts are never printed: the saved prompts appear in no output stream
    for row in saved:
        assert row["prompt"][:30] not in captured.out + captured.err
