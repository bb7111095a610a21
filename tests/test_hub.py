"""Masks on the Hugging Face Hub, offline: local folders, a populated HF cache, revisions, the model card, specs.

Everything runs against the real ``huggingface_hub`` (no stand-ins). The Hub itself is not reachable here: the cache is
written in the layout ``huggingface_hub`` writes (``models--org--name/{blobs,refs,snapshots}``, checked with its own
``scan_cache_dir``), and uploads are exercised up to the first network request (``OfflineModeIsEnabled``).
"""
from __future__ import annotations

import copy
import hashlib
import json
import os
import re
import subprocess
import sys
import warnings
from pathlib import Path

import huggingface_hub as hf
import pytest
import torch
from huggingface_hub import constants as hf_constants
from huggingface_hub import errors as hf_errors

from ssah_plugin.core.hub import (
    CARD_FILENAME,
    MASK_FILENAME,
    MaskHubError,
    MaskSpec,
    MaskSpecError,
    parse_mask_spec,
)
from ssah_plugin.core.mask import Mask
from ssah_plugin.core.plan import plan_frozen_slices
from ssah_plugin.core.policies import PolicyError
from ssah_plugin.errors import MaskFormatError, MissingExtraError

REPO = "org/name"
COMMIT_A = "a" * 40
COMMIT_B = "b" * 40
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def located(tiny_llama):
    """A classified mask from a real (small) locate run on the shipped data: default policy ru-only."""
    from ssah_plugin.locate import LocateConfig, locate

    model, tok = tiny_llama
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "rows truncated to max_length": intended here
        return locate(model, tok, config=LocateConfig(max_samples=8, max_length=64, progress=False))


@pytest.fixture(scope="module")
def explicit(tiny_llama):
    return Mask.from_units(tiny_llama[0], {"model.layers.0.mlp": [1, 2, 3], "model.layers.1.self_attn": [0, 5]})


def _blob_name(name: str, data: bytes) -> str:
    """The etag huggingface_hub names a blob by: sha256 for LFS files (safetensors), the git blob sha1 otherwise."""
    if name.endswith(".safetensors"):
        return hashlib.sha256(data).hexdigest()
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def _populate(cache: Path, folder: Path, commit: str, refs: tuple[str, ...], repo: str = REPO) -> Path:
    """Put ``folder``'s files into ``cache`` as the snapshot ``commit`` of ``repo``, the way hf_hub_download does."""
    repo_dir = cache / ("models--" + repo.replace("/", "--"))
    snap = repo_dir / "snapshots" / commit
    (repo_dir / "blobs").mkdir(parents=True, exist_ok=True)
    (repo_dir / "refs").mkdir(exist_ok=True)
    snap.mkdir(parents=True, exist_ok=True)
    for f in sorted(folder.iterdir()):
        data = f.read_bytes()
        blob = repo_dir / "blobs" / _blob_name(f.name, data)
        blob.write_bytes(data)
        (snap / f.name).symlink_to(os.path.relpath(blob, snap))
    for ref in refs:
        (repo_dir / "refs" / ref).write_text(commit)
    return repo_dir


@pytest.fixture()
def offline_cache(tmp_path, located, explicit, monkeypatch):
    """An HF cache holding REPO: main -> commit A (the located mask), tag v1 -> commit B (the explicit mask)."""
    cache = tmp_path / "hf-cache"
    located.save_pretrained(tmp_path / "a", repo_id=REPO)
    explicit.save_pretrained(tmp_path / "b", repo_id=REPO, revision="v1")
    _populate(cache, tmp_path / "a", COMMIT_A, ("main",))
    _populate(cache, tmp_path / "b", COMMIT_B, ("v1",))
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(cache))
    return cache


def _payload(path: Path) -> tuple[dict, dict]:
    """A mask file's metadata and tensors (safetensors orders the header freely, so bytes may differ run to run)."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return f.metadata(), {k: f.get_tensor(k) for k in f.keys()}


def _same_payload(a: Path, b: Path) -> bool:
    (meta_a, ta), (meta_b, tb) = _payload(a), _payload(b)
    return meta_a == meta_b and ta.keys() == tb.keys() and all(
        ta[k].dtype == tb[k].dtype and ta[k].shape == tb[k].shape and torch.equal(ta[k], tb[k]) for k in ta)


# ---------------------------------------------------------------------------------------------- local folders
def test_save_pretrained_and_from_pretrained_local_folder(located, tmp_path):
    folder = located.save_pretrained(tmp_path / "shared")
    assert sorted(p.name for p in folder.iterdir()) == [CARD_FILENAME, MASK_FILENAME]
    assert _same_payload(folder / MASK_FILENAME, located.save(tmp_path / "direct.safetensors"))
    for source in (folder, str(folder), folder / MASK_FILENAME):
        loaded = Mask.from_pretrained(source)
        assert loaded.checksum == located.checksum
        assert _same_payload(loaded.save(tmp_path / "again.safetensors"), folder / MASK_FILENAME)
        assert all(torch.equal(a, b) for a, b in zip(loaded.classes, located.classes))
    with pytest.raises(MaskSpecError, match="Hub repos only"):
        Mask.from_pretrained(folder, revision="v1")
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "weights.safetensors").write_bytes(b"x")
    with pytest.raises(MaskFormatError, match=r"holds no 'ssah_mask.safetensors'.*weights.safetensors"):
        Mask.from_pretrained(empty)


# ---------------------------------------------------------------------------------------------- offline HF cache
def test_offline_cache_layout_revisions_and_errors(offline_cache, located, explicit):
    info = hf.scan_cache_dir(offline_cache)  # huggingface_hub's own reading of the cache we wrote
    (repo,) = info.repos
    assert repo.repo_id == REPO and {r.commit_hash for r in repo.revisions} == {COMMIT_A, COMMIT_B}
    assert {ref for r in repo.revisions for ref in r.refs} == {"main", "v1"}
    path = hf.hf_hub_download(REPO, MASK_FILENAME)
    assert Path(path) == offline_cache / "models--org--name" / "snapshots" / COMMIT_A / MASK_FILENAME
    assert Mask.from_pretrained(REPO).checksum == located.checksum
    assert Mask.from_pretrained(REPO, cache_dir=offline_cache, local_files_only=True).checksum == located.checksum
    assert Mask.from_pretrained(REPO, revision="v1").checksum == explicit.checksum
    assert Mask.from_pretrained(REPO, revision=COMMIT_B).checksum == explicit.checksum
    with pytest.raises(MaskHubError, match=r"revision 'v2' is not in the Hugging Face cache .*HF_HUB_OFFLINE is set"
                       ) as exc:
        Mask.from_pretrained(REPO, revision="v2")
    assert isinstance(exc.value.__cause__, hf_errors.LocalEntryNotFoundError)
    assert "hf download org/name ssah_mask.safetensors --revision v2" in str(exc.value)
    with pytest.raises(MaskHubError, match="'other.safetensors' of Hub repo 'org/name'"):
        Mask.from_pretrained(REPO, filename="other.safetensors")
    with pytest.raises(MaskHubError, match="'org/missing'"):
        Mask.from_pretrained("org/missing")


def test_env_vars_alone_select_the_cache(offline_cache, explicit):
    """HF_HUB_OFFLINE / HF_HUB_CACHE set in the environment of a fresh process (read by huggingface_hub at import)."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HUB_CACHE=str(offline_cache))
    code = "from ssah_plugin.core.mask import Mask; print(Mask.from_spec('org/name@v1').checksum)"
    out = subprocess.run([sys.executable, "-c", code], env=env, cwd=ROOT, capture_output=True, text=True, timeout=300,
                         check=False)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == explicit.checksum


# ---------------------------------------------------------------------------------------------- specs
@pytest.mark.parametrize("spec, expected", [
    ("org/name", MaskSpec("org/name", None, None)),
    ("org/name:scu", MaskSpec("org/name", None, "scu")),
    ("org/name:scu+cu:0.1", MaskSpec("org/name", None, "scu+cu:0.1")),
    ("org/name@v1", MaskSpec("org/name", "v1", None)),
    ("org/name@v1:scu+cu6", MaskSpec("org/name", "v1", "scu+cu6")),
    ("org/name@refs/pr/3:scu", MaskSpec("org/name", "refs/pr/3", "scu")),
    ("Org-1/na_me.v2@" + COMMIT_A, MaskSpec("Org-1/na_me.v2", COMMIT_A, None)),
    ("mask.safetensors", MaskSpec(Path("mask.safetensors"), None, None)),
    ("mask.safetensors:scu", MaskSpec(Path("mask.safetensors"), None, "scu")),
    ("masks/llama/mask.safetensors:scu", MaskSpec(Path("masks/llama/mask.safetensors"), None, "scu")),
    ("./org/name:scu", MaskSpec(Path("org/name"), None, "scu")),
    ("../x@v1", MaskSpec(Path("../x@v1"), None, None)),
    ("folder", MaskSpec(Path("folder"), None, None)),
    ("a/b/c", MaskSpec(Path("a/b/c"), None, None)),
    ("C:\\masks\\m.safetensors:scu", MaskSpec(Path("C:\\masks\\m.safetensors"), None, "scu")),
    ("C:/masks/dir", MaskSpec(Path("C:/masks/dir"), None, None)),
])
def test_parse_mask_spec(spec, expected, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # nothing exists here
    assert parse_mask_spec(spec) == expected
    assert parse_mask_spec(spec).is_local == isinstance(expected.source, Path)


@pytest.mark.parametrize("spec, message", [
    ("", "empty mask spec"),
    ("org/name:", "names no policy"),
    ("org/name@", "must be followed by a revision"),
    ("org/name@v1@v2", "more than one '@'"),
    ("org/na--me", "neither an existing local file or folder nor a Hub repo id"),
    ("org/-name", "nor a Hub repo id"),
    ("org/name: scu", "surrounding spaces"),
    (":scu", "names no mask before the ':'"),
    ("o/" + "n" * 100, "nor a Hub repo id"),
])
def test_parse_mask_spec_errors(spec, message, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(MaskSpecError, match=re.escape(message)):
        parse_mask_spec(spec)
    with pytest.raises(MaskSpecError):
        parse_mask_spec(3)  # type: ignore[arg-type]


def test_existing_local_paths_win(tmp_path, monkeypatch, explicit):
    monkeypatch.chdir(tmp_path)
    odd = tmp_path / "v1:scu@x.safetensors"  # ':' and '@' in a real file name: the whole name is the path
    explicit.save(odd)
    assert parse_mask_spec(str(odd)) == MaskSpec(odd, None, None)
    assert parse_mask_spec(odd.name + ":scu") == MaskSpec(Path(odd.name), None, "scu")
    explicit.save_pretrained(tmp_path / "org" / "name")  # a local folder shadows the Hub repo of that name
    assert parse_mask_spec("org/name:explicit") == MaskSpec(Path("org/name"), None, "explicit")
    assert Mask.from_spec("org/name").checksum == explicit.checksum
    assert parse_mask_spec(Path("org/name:x")) == MaskSpec(Path("org/name:x"), None, None)  # a Path is never parsed


def test_from_spec_policy(located, tmp_path):
    folder = located.save_pretrained(tmp_path / "m")
    m = Mask.from_spec(f"{folder}:scu")
    assert m.default_policy == "scu" and m.frozen_set_digest() == located.frozen_set_digest("scu")
    assert Mask.from_spec(f"{folder}:scu", policy="scu").default_policy == "scu"
    assert Mask.from_spec(str(folder)).default_policy == "ru-only"
    with pytest.raises(MaskSpecError, match=r"names policy 'scu' but policy='scu\+cu' was also passed"):
        Mask.from_spec(f"{folder}:scu", policy="scu+cu")
    with pytest.raises(PolicyError, match="nonsense"):
        Mask.from_spec(f"{folder}:nonsense")
    with pytest.raises(MaskFormatError, match="does not exist"):
        Mask.from_spec(str(tmp_path / "missing.safetensors") + ":scu")


# ---------------------------------------------------------------------------------------------- the card
def _card_rows(text: str, header: str) -> list[list[str]]:
    """The rows of the markdown table that follows ``header``."""
    block = text.split(header, 1)[1].strip().split("\n\n", 1)[0]
    return [[c.strip() for c in line.strip("|").split("|")] for line in block.splitlines()[2:]]


def test_model_card_content(located, tiny_llama, tmp_path, capsys):
    from safetensors import safe_open

    from ssah_plugin.cli import main

    folder = located.save_pretrained(tmp_path / "m", repo_id=REPO, base_model="org/base-chat", license="apache-2.0")
    card = hf.ModelCard.load(folder / CARD_FILENAME)  # huggingface_hub parses the front matter
    assert card.data.base_model == "org/base-chat" and card.data.library_name == "ssah-plugin"
    assert card.data.license == "apache-2.0" and {"ssah-plugin", "llama"} <= set(card.data.tags)
    text = card.text
    with safe_open(str(folder / MASK_FILENAME), framework="pt") as f:
        meta = f.metadata()
    assert meta["base_fingerprint"] in text and meta["checksum"] in text and located.config_hash in text
    assert 'SSAHCallback("org/name:ru-only")' in text
    assert "- method: `ssah-locate`" in text and "| max_samples | `8` |" in text and "| scu | `0.013` |" in text
    classes = {r[0]: int(r[1]) for r in _card_rows(text, "## Unit classes")}
    assert classes == {**located.summary()["classes"], "all": located.n_units}
    # the policy table: the numbers `ssah-plugin inspect --json` prints, and the elements the live plan freezes
    assert main(["inspect", str(folder / MASK_FILENAME), "--json"]) == 0
    rep = json.loads(capsys.readouterr().out)["frozen"]
    rows = {r[0].split("`")[1]: r for r in _card_rows(text, "## Frozen per policy")}
    assert set(rows) == set(rep) == {"scu", "scu+cu6", "scu+cu", "ru-only"}
    assert "(default)" in rows["ru-only"][0] and "(default)" not in rows["scu+cu6"][0]
    for pol, row in rows.items():
        assert int(row[1]) == rep[pol]["units"] == sum(int(s.sum()) for s in located.frozen(pol))
        assert row[2] == f"{rep[pol]['fraction']:.2%}"
        assert [int(row[3]), int(row[4])] == [rep[pol]["per_module_type"]["mlp"], rep[pol]["per_module_type"]["attn"]]
        assert int(row[5]) == rep[pol]["elements"] == sum(s.numel for s in plan_frozen_slices(located, tiny_llama[0],
                                                                                               pol))
    # calibration data: licences quoted from the shipped README (its table row and its caveat)
    readme = (ROOT / "ssah_plugin" / "data" / "README.md").read_text()
    safety_row = next(line for line in readme.splitlines() if line.startswith("| `safety_refusals.jsonl`"))
    data = {r[0]: r for r in _card_rows(text, "## Calibration data and licences")}
    assert data["safety"][1] == "`shipped:safety_refusals.jsonl`" and data["safety"][2] == "8"
    assert safety_row.split("|")[4].strip() in data["safety"][3]
    assert "Apache-2.0 / MIT / MIT" in data["utility"][3]
    assert "Llama-2-7b-chat. Its Community Licence (§1.b.v) forbids using Llama outputs" in text
    assert "Licence of this mask: `apache-2.0`" in text


def test_locate_records_the_hub_base_model_for_the_card(tiny_llama, tmp_path, monkeypatch):
    """locate keeps the config's Hub id (never a local folder) and save_pretrained puts it in the card."""
    from ssah_plugin.locate import LocateConfig, locate

    model, tok = copy.deepcopy(tiny_llama[0]), tiny_llama[1]
    (tmp_path / "org").mkdir()
    (tmp_path / "org" / "local-copy").mkdir()
    monkeypatch.chdir(tmp_path)
    found = {}
    for name in ("org/base-chat", "org/local-copy", str(tmp_path / "org" / "local-copy"), ""):
        model.config._name_or_path = name
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            mask = locate(model, tok, config=LocateConfig(max_samples=2, max_length=32, progress=False))
        folder = Mask.load(mask.save_pretrained(tmp_path / "out" / str(len(found))) / MASK_FILENAME)
        card = hf.ModelCard.load(tmp_path / "out" / str(len(found)) / CARD_FILENAME)
        found[name] = (folder.method.get("base_model"), card.data.base_model)
    assert found["org/base-chat"] == ("org/base-chat", "org/base-chat")
    assert found["org/local-copy"] == (None, None)  # a relative folder that exists here is not a Hub id
    assert found[str(tmp_path / "org" / "local-copy")] == (None, None) and found[""] == (None, None)
    explicit_arg = mask.save_pretrained(tmp_path / "given", base_model="org/other")
    assert hf.ModelCard.load(explicit_arg / CARD_FILENAME).data.base_model == "org/other"


def test_model_card_without_provenance(explicit, located, tmp_path):
    folder = explicit.save_pretrained(tmp_path / "e")
    card = hf.ModelCard.load(folder / CARD_FILENAME)
    assert card.data.base_model is None and card.data.license is None and card.data.library_name == "ssah-plugin"
    assert 'SSAHCallback("<org>/<name>:explicit")' in card.text and "None: an explicit mask" in card.text
    assert "does not record which data it was located on" in card.text and "not stated by its author" in card.text
    rows = {r[0].split("`")[1]: r for r in _card_rows(card.text, "## Frozen per policy")}
    assert set(rows) == {"explicit"} and int(rows["explicit"][1]) == 5
    own = copy.deepcopy(located)
    own.method["data"] = dict(own.method["data"], safety_source=str(tmp_path / "my_refusals.jsonl"))
    text = own.save_pretrained(tmp_path / "o").joinpath(CARD_FILENAME).read_text()
    assert "not known to ssah-plugin: check the licence" in text and "Community Licence" not in text


# ---------------------------------------------------------------------------------------------- hosts
def test_callback_with_hub_spec_freezes_the_spec_policy(offline_cache, located, tiny_llama, tmp_path):
    from datasets import Dataset
    from transformers import Trainer, TrainingArguments

    from ssah_plugin.hosts.callback import SSAHCallback

    with pytest.raises(MaskSpecError, match="names policy 'scu' but policy='scu\\+cu' was also passed"):
        SSAHCallback(f"{REPO}:scu", policy="scu+cu")
    cb = SSAHCallback(f"{REPO}:scu")
    assert cb.policy == "scu"
    assert cb.mask.frozen_set_digest() == located.frozen_set_digest("scu")
    model = copy.deepcopy(tiny_llama[0])
    base = {n: p.detach().clone() for n, p in model.named_parameters()}
    ids = torch.randint(3, 500, (8, 16), generator=torch.Generator().manual_seed(0)).tolist()
    args = TrainingArguments(output_dir=str(tmp_path / "out"), per_device_train_batch_size=4, max_steps=3,
                             learning_rate=1e-2, report_to=[], save_strategy="no", use_cpu=True, seed=0,
                             disable_tqdm=True, dataloader_num_workers=0)
    Trainer(model=model, args=args, train_dataset=Dataset.from_dict({"input_ids": ids, "labels": ids}),
            callbacks=[cb]).train()
    params = dict(model.named_parameters())

    def dense(policy: str) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        for g, frozen in zip(located.groups, located.frozen(policy)):
            for s in g.slices:
                m = out.setdefault(s.name, torch.zeros_like(base[s.name], dtype=torch.bool))
                for u in frozen.nonzero().reshape(-1).tolist():
                    m.index_fill_(s.axis, s.index[u], True)
        return out

    scu, wider = dense("scu"), dense("scu+cu6")
    assert sum(int(m.sum()) for m in scu.values()) > 0
    for name, m in scu.items():
        assert torch.equal(params[name].detach()[m], base[name][m]), name  # bitwise
        only_wider = wider[name] & ~m  # frozen by scu+cu6, trained under the spec's policy
        if only_wider.any():
            assert not torch.equal(params[name].detach()[only_wider], base[name][only_wider]), name


def test_optimizer_takes_a_spec(located, tiny_llama, tmp_path):
    from ssah_plugin.hosts.optim import SSAHOptimizer

    folder = located.save_pretrained(tmp_path / "m")
    model = copy.deepcopy(tiny_llama[0])
    opt = SSAHOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), model, f"{folder}:scu")
    assert opt.policy == "scu"
    assert opt.enforcer.frozen_elements == sum(s.numel for s in plan_frozen_slices(located, model, "scu"))
    with pytest.raises(MaskSpecError, match="names policy 'scu'"):
        SSAHOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), model, f"{folder}:scu", policy="ru-only")


# ---------------------------------------------------------------------------------------------- upload, extra
def test_push_to_hub_offline_reaches_the_network_call(located, monkeypatch, caplog):
    """Real uploads are not exercised: this checks the path up to huggingface_hub's first request."""
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)
    caplog.set_level("INFO", logger="ssah_plugin.core.hub")
    with pytest.raises(hf_errors.OfflineModeIsEnabled, match="repos/create"):
        located.push_to_hub(REPO, revision="v1", private=True, token="hf_not_a_token")
    assert f"uploading ['{CARD_FILENAME}', '{MASK_FILENAME}'] to {REPO} (revision v1)" in caplog.text
    for bad in ("name", "org/na--me", "a/b/c"):
        with pytest.raises(MaskSpecError, match="push_to_hub needs a repo id"):
            located.push_to_hub(bad)


def test_missing_huggingface_hub_names_the_extra(explicit, tmp_path, monkeypatch):
    folder = explicit.save_pretrained(tmp_path / "m")
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)  # import fails as if not installed
    with pytest.raises(MissingExtraError, match=re.escape("pip install 'ssah-plugin[hub]'")):
        Mask.from_pretrained(REPO)
    with pytest.raises(MissingExtraError, match="hub"):
        explicit.push_to_hub(REPO)
    assert Mask.from_spec(f"{folder}:explicit").checksum == explicit.checksum  # local folders need no hub
