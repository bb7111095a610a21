"""The README's first command: `ssah-plugin demo` runs end to end (smaller sizes) and proves bit-exact freezing."""
import json

from ssah_plugin.cli import main


def test_demo_end_to_end(tmp_path, capsys):
    rc = main(["demo", "--out", str(tmp_path), "--align-steps", "20", "--tune-steps", "4", "--eval-prompts", "4"])
    assert rc == 0
    summary = json.loads((tmp_path / "demo.json").read_text())
    assert summary["verify"]["ssah"]["ok"] is True
    assert summary["verify"]["ssah"]["total"]["changed_units"] == 0
    # The control run without the plugin moves the same units: the check is not vacuous.
    assert summary["verify"]["plain"]["ok"] is False
    assert summary["verify"]["plain"]["total"]["changed_units"] > 0
    names = [r["model"] for r in summary["eval"]]
    # the recipe arm (freezing + own-refusal replay) runs when the toy learned refusals to replay
    assert names == ["base", "plain", "ssah", "recipe"] if summary["own_refusals"] else names == ["base", "plain", "ssah"]
    if summary["own_refusals"]:
        assert summary["verify"]["recipe"]["ok"] is True
    assert (tmp_path / "mask.safetensors").is_file()
    assert "bit-exact with the plugin: True" in capsys.readouterr().out
