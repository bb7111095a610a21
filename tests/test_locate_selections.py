"""Decision units and task-conflict units (locate_decision, locate_conflict, selections): scores against direct
computations, stored sets == exact top-F, policies, bit-exact freezing, CLI end to end, set-up errors."""
from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from ssah_plugin.core.mask import CLASS_CODES, Mask
from ssah_plugin.core.policies import PolicyError, resolve_policy
from ssah_plugin.core.units import describe_units
from ssah_plugin.data.chat import chat_pair_ids, chat_prompt
from ssah_plugin.data.rows import fit_pair, load_pairs
from ssah_plugin.errors import DataError, UnsupportedSetupError
from ssah_plugin.io.tiny import tiny_model, tiny_tokenizer
from ssah_plugin.locate import LocateConfig, locate, standardize

SAFETY = load_pairs("shipped:safety_refusals.jsonl", max_samples=40, seed=3)
UTILITY = load_pairs("shipped:benign_instructions.jsonl", max_samples=12, seed=3)
TASK = load_pairs("shipped:benign_instructions.jsonl", max_samples=30, seed=7)[-5:]


def _short(pairs, n, words=24):
    """The first n pairs with distinct prompts, responses cut to ``words`` words (tiny models have 256 positions)."""
    out, seen = [], set()
    for p, r in pairs:
        if p not in seen and len(out) < n:
            seen.add(p)
            out.append((p, " ".join(r.split()[:words])))
    return out


HARMFUL_PAIRS = _short(SAFETY, 6)
HARMFUL_PAIRS.append(HARMFUL_PAIRS[0])  # a repeated prompt: counted once by the decision score
BENIGN_PAIRS = _short(UTILITY, 5)
TASK_PAIRS = _short(TASK, 5)


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


def _cfg(**kw) -> LocateConfig:
    base = dict(max_samples=None, max_length=96, batch_size=3, progress=False, task_max_samples=None)
    base.update(kw)
    return LocateConfig(**base)


def _located(family, tok, granularity="channel", **kw):
    model = tiny_model(family).eval()
    mask = locate(model, tok, safety=HARMFUL_PAIRS, utility=BENIGN_PAIRS, task=TASK_PAIRS,
                  config=_cfg(decision_units=True, granularity=granularity, **kw))
    return model, mask


@pytest.fixture(scope="module")
def llama_located(tok):
    return _located("llama", tok)


# ======================================================================================== decision: direct check
def _prompt_end_acts(model, tok, prompts, modules):
    """Input of each score module at the last prompt token, one prompt at a time (no batching, no padding)."""
    acts = {m: [] for m in modules}
    hooks = [model.get_submodule(m).register_forward_pre_hook(
        lambda mod, a, m=m: acts[m].append(a[0][0, -1].detach().double())) for m in modules]
    with torch.no_grad():
        for p in prompts:
            ids = tok(chat_prompt(tok, p), add_special_tokens=False)["input_ids"][-96:]  # max_length keeps the end
            model(input_ids=torch.tensor([ids]))
    for h in hooks:
        h.remove()
    return {m: torch.stack(v) for m, v in acts.items()}


def _direct_decision(model, tok, groups, weight=True):
    harmful = list(dict.fromkeys(p for p, _ in HARMFUL_PAIRS))
    benign = list(dict.fromkeys(p for p, _ in BENIGN_PAIRS))
    assert len(harmful) == 6
    modules = sorted({g.score_module for g in groups})
    xh, xb = _prompt_end_acts(model, tok, harmful, modules), _prompt_end_acts(model, tok, benign, modules)
    out = []
    for g in groups:
        a, b = xh[g.score_module], xb[g.score_module]
        na, nb = a.shape[0], b.shape[0]
        pooled = (((na - 1) * a.var(0, unbiased=True) + (nb - 1) * b.var(0, unbiased=True)) / (na + nb - 2)).sqrt()
        d = (a.mean(0) - b.mean(0)).abs() / pooled
        if weight:
            w = model.get_submodule(g.score_module).weight.detach().double()
            d = d * (w.norm(dim=0) if g.score_layout == "linear" else w.norm(dim=1))
        out.append(d.reshape(g.n_units, -1).sum(1))  # head: sum of its channels
    return out


@pytest.mark.parametrize("family,granularity", [("llama", "channel"), ("gpt2", "channel"), ("qwen2", "head")])
def test_decision_scores_equal_direct_computation(tok, family, granularity):
    # batch_size 1: the same float32 activations as the direct per-prompt forward; everything after is float64
    model, mask = _located(family, tok, granularity, batch_size=1)
    groups = describe_units(model, granularity)
    direct = _direct_decision(model, tok, groups)
    for got, want in zip(mask.scores["decision"], direct):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12)
    for got, want in zip(mask.scores["decision_z"], standardize(direct, "group")):
        torch.testing.assert_close(got, want, rtol=1e-8, atol=1e-9)
    sel = mask.method["selections"]["decision"]
    assert sel["n_harmful_prompts"] == 6 and sel["n_benign_prompts"] == 5 and sel["weight"] == "norm"


def test_decision_scores_do_not_depend_on_batching(tok, llama_located):
    """Right padding changes only float32 rounding (the prompt end is each row's own last real token)."""
    model, batched = llama_located  # batch_size 3, rows of different lengths: padded batches
    one = locate(model, tok, safety=HARMFUL_PAIRS, utility=BENIGN_PAIRS, config=_cfg(decision_units=True,
                                                                                     batch_size=1))
    for a, b in zip(batched.scores["decision"], one.scores["decision"]):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-6)


def test_decision_weight_none_is_cohens_d(tok):
    model = tiny_model("llama").eval()
    mask = locate(model, tok, safety=HARMFUL_PAIRS, utility=BENIGN_PAIRS,
                  config=_cfg(decision_units=True, decision_weight="none", batch_size=1))
    direct = _direct_decision(model, tok, describe_units(model), weight=False)
    for got, want in zip(mask.scores["decision"], direct):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-9)
    assert "conflict_dot" not in mask.scores and mask.policies == ["decision"]  # no task data: no conflict units


# ======================================================================================== conflict: autograd check
def _mean_response_ce(model, tok, pairs, max_length=96):
    """Mean cross-entropy over all response tokens of ``pairs``, one sequence at a time."""
    losses = []
    for p, r in pairs:
        p_ids, r_ids, _ = fit_pair(*chat_pair_ids(tok, p, r), max_length)  # the one truncation rule
        ids = p_ids + r_ids
        logits = model(input_ids=torch.tensor([ids])).logits[0]
        start = len(p_ids) - 1
        losses.append(F.cross_entropy(logits[start:len(ids) - 1].float(), torch.tensor(ids[start + 1:]),
                                      reduction="none"))
    return torch.cat(losses).mean()


def _unit_vectors(model, grads, family):
    """Per group: [n_units, -1] gradient blocks, written out by hand from the architecture (not from the mask)."""
    cfg = model.config
    out = []
    if family == "gpt2":
        d = cfg.n_embd
        for li in range(cfg.n_layer):
            pre = f"transformer.h.{li}"
            fc_w, fc_b, proj = (grads[f"{pre}.mlp.c_fc.weight"], grads[f"{pre}.mlp.c_fc.bias"],
                                grads[f"{pre}.mlp.c_proj.weight"])  # Conv1D: [in, out]
            out.append(torch.cat([fc_w.T, fc_b[:, None], proj], 1))
            at_w, at_b, o = (grads[f"{pre}.attn.c_attn.weight"], grads[f"{pre}.attn.c_attn.bias"],
                             grads[f"{pre}.attn.c_proj.weight"])
            out.append(torch.cat([at_w[:, 2 * d:].T, at_b[2 * d:, None], o], 1))  # value block after q and k
        return out
    hd = cfg.hidden_size // cfg.num_attention_heads
    per_kv = cfg.num_attention_heads // cfg.num_key_value_heads
    for li in range(cfg.num_hidden_layers):
        pre = f"model.layers.{li}"
        out.append(torch.cat([grads[f"{pre}.mlp.gate_proj.weight"], grads[f"{pre}.mlp.up_proj.weight"],
                              grads[f"{pre}.mlp.down_proj.weight"].T], 1))
        o = grads[f"{pre}.self_attn.o_proj.weight"]
        v = grads[f"{pre}.self_attn.v_proj.weight"]
        rows = [((j // hd) // per_kv) * hd + j % hd for j in range(o.shape[1])]
        parts = [o.T, v[rows]]
        vb = grads.get(f"{pre}.self_attn.v_proj.bias")
        if vb is not None:
            parts.append(vb[rows, None])
        out.append(torch.cat(parts, 1))
    return out


@pytest.mark.parametrize("family", ["llama", "qwen2", "gpt2"])
def test_conflict_scores_equal_autograd_per_unit(tok, family):
    model = tiny_model(family).eval()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    mask = locate(model, tok, safety=HARMFUL_PAIRS, utility=BENIGN_PAIRS, task=TASK_PAIRS, config=_cfg())
    # the model is left as it was: weights bitwise, flags, no .grad, eval mode
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    assert all(p.requires_grad == flags[n] and p.grad is None for n, p in model.named_parameters())
    assert not model.training
    names = [n for n, _ in model.named_parameters()]
    params = list(model.parameters())
    g_t = dict(zip(names, torch.autograd.grad(_mean_response_ce(model, tok, TASK_PAIRS), params, allow_unused=True)))
    g_r = dict(zip(names, torch.autograd.grad(_mean_response_ce(model, tok, HARMFUL_PAIRS), params,
                                              allow_unused=True)))
    g_t = {k: v.double() for k, v in g_t.items() if v is not None}
    g_r = {k: v.double() for k, v in g_r.items() if v is not None}
    for gi, (a, b) in enumerate(zip(_unit_vectors(model, g_t, family), _unit_vectors(model, g_r, family))):
        dot = (a * b).sum(1)
        cos = dot / (a.norm(dim=1) * b.norm(dim=1))
        scale = float(dot.abs().max())
        torch.testing.assert_close(mask.scores["conflict_dot"][gi], dot, rtol=1e-4, atol=1e-5 * scale)
        torch.testing.assert_close(mask.scores["conflict_cos"][gi], cos, rtol=1e-4, atol=1e-4)
    sel = mask.method["selections"]["conflict"]
    assert sel["n_task"] == 5 and sel["n_refusal"] == len(HARMFUL_PAIRS)
    with torch.no_grad():
        assert abs(sel["task_loss"] - float(_mean_response_ce(model, tok, TASK_PAIRS))) < 1e-4
    flat = torch.cat(mask.scores["conflict_dot"])
    assert sel["n_negative_dot"] == int((flat < 0).sum()) and 0 < sel["n_negative_dot"] < flat.numel()


# ======================================================================================== stored sets and policies
def _top(values, k, highest=True):
    """Independent top-k: sort (score, position) pairs in Python."""
    flat = torch.cat(values).tolist()
    order = sorted(range(len(flat)), key=lambda i: (-flat[i] if highest else flat[i], i))
    chosen = set(order[:k])
    return [i in chosen for i in range(len(flat))]


def _flat(sets):
    return torch.cat(sets).tolist()


def test_stored_sets_and_policies_are_exact_top_fractions(llama_located):
    _, mask = llama_located
    n = mask.n_units
    assert mask.policies == ["decision", "conflict"] and mask.default_policy == "ru-only"
    assert _flat(mask.stored["decision"]) == _top(mask.scores["decision_z"], round(0.05 * n))
    assert _flat(mask.stored["conflict"]) == _top(mask.scores["conflict_dot"], round(0.05 * n), highest=False)
    assert mask.method["selections"]["decision"]["stored_units"] == round(0.05 * n)
    for f in (0.0, 0.013, 0.1, 0.5, 1.0):
        k = round(f * n)
        assert _flat(resolve_policy(mask, f"decision:{f}")) == _top(mask.scores["decision_z"], k)
        assert _flat(resolve_policy(mask, f"conflict:{f}")) == _top(mask.scores["conflict_dot"], k, highest=False)
        assert _flat(resolve_policy(mask, f"conflict-cos:{f}")) == _top(mask.scores["conflict_cos"], k, highest=False)
    assert _flat(resolve_policy(mask, "decision")) == _flat(resolve_policy(mask, "decision:0.05"))
    scu = torch.cat([c == CLASS_CODES["SCU"] for c in mask.classes])
    union = _flat(resolve_policy(mask, "scu+decision:0.1"))
    assert union == (scu | torch.tensor(_top(mask.scores["decision_z"], round(0.1 * n)))).tolist()
    cu6 = torch.cat(resolve_policy(mask, "scu+cu6"))
    conflict = torch.tensor(_top(mask.scores["conflict_dot"], round(0.02 * n), highest=False))
    assert _flat(resolve_policy(mask, "scu+cu6+conflict:0.02")) == (cu6 | conflict).tolist()
    both = torch.cat(resolve_policy(mask, "decision:0.05+conflict"))
    assert both.tolist() == (torch.cat(mask.stored["decision"]) | torch.cat(mask.stored["conflict"])).tolist()
    assert _flat(resolve_policy(mask, "conflict+scu")) == (torch.cat(mask.stored["conflict"]) | scu).tolist()


def test_round_trip_keeps_selections(llama_located, tmp_path):
    model, mask = llama_located
    back = Mask.load(mask.save(tmp_path / "sel.safetensors"))
    for k in ("decision", "decision_z", "conflict_dot", "conflict_cos"):
        assert all(torch.equal(a, b) for a, b in zip(mask.scores[k], back.scores[k]))
    assert back.policies == ["decision", "conflict"] and back.method["selections"] == mask.method["selections"]
    for pol in ("decision", "conflict", "decision:0.1", "scu+conflict:0.1"):
        assert _flat(back.frozen(pol)) == _flat(mask.frozen(pol))
    back.validate(model)


@pytest.mark.parametrize("policy", ["decision:0.1", "scu+conflict:0.08"])
def test_callback_keeps_selected_units_bit_exact(llama_located, tmp_path, policy):
    from datasets import Dataset
    from transformers import Trainer, TrainingArguments

    from ssah_plugin.hosts.callback import SSAHCallback

    base_model, mask = llama_located
    model = tiny_model("llama")  # same seed: the weights the mask was located on
    base = {n: p.detach().clone() for n, p in model.named_parameters()}
    params = dict(model.named_parameters())
    dense = {}
    sets = mask.frozen(policy)
    assert sum(int(s.sum()) for s in sets) > 0
    for g, frozen in zip(mask.groups, sets):
        for s in g.slices:
            m = dense.setdefault(s.name, torch.zeros_like(params[s.name], dtype=torch.bool))
            for u in torch.nonzero(frozen).squeeze(1).tolist():
                m.index_fill_(s.axis, s.index[u], True)
    ids = torch.randint(3, 500, (8, 16), generator=torch.Generator().manual_seed(0)).tolist()
    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=2, max_steps=3,
                             learning_rate=1e-2, weight_decay=0.1, save_strategy="no", report_to=[], use_cpu=True,
                             disable_tqdm=True, dataloader_num_workers=0, seed=0)
    cb = SSAHCallback(mask, policy=policy)
    Trainer(model=model, args=args, train_dataset=Dataset.from_dict({"input_ids": ids, "labels": ids}),
            callbacks=[cb]).train()
    assert cb.summary["max_drift"] == 0.0 and cb.summary["frozen_units"] == sum(int(s.sum()) for s in sets)
    for name, m in dense.items():
        p = params[name].detach()
        assert torch.equal(p[m], base[name][m]), name
        assert not torch.equal(p[~m], base[name][~m]), f"{name} did not train"


def test_optimizer_wrapper_keeps_selected_units_bit_exact(llama_located):
    from ssah_plugin.core.plan import plan_frozen_slices
    from ssah_plugin.hosts.optim import SSAHOptimizer

    _, mask = llama_located
    model = tiny_model("llama")
    base = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = SSAHOptimizer(torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1), model, mask,
                        policy="conflict")
    for _ in range(2):
        x = torch.randint(3, 500, (2, 12), generator=torch.Generator().manual_seed(1))
        model(input_ids=x, labels=x).loss.backward()
        opt.step()
        opt.zero_grad()
    params = dict(model.named_parameters())
    slices = plan_frozen_slices(mask, model, "conflict")
    assert slices
    for fs in slices:
        name = next(n for n, p in params.items() if p is fs.param)
        assert torch.equal(fs.param.detach().index_select(fs.axis, fs.index),
                           base[name].index_select(fs.axis, fs.index)), name


# ======================================================================================== CLI
def _write_jsonl(path, pairs):
    path.write_text("".join(json.dumps({"prompt": p, "response": r}) + "\n" for p, r in pairs))
    return path


def test_cli_locate_and_inspect_end_to_end(tmp_path, capsys):
    from ssah_plugin.cli import main

    task = _write_jsonl(tmp_path / "task.jsonl", TASK_PAIRS)
    out = tmp_path / "sel.mask.safetensors"
    rc = main(["locate", "--model", "tiny:llama", "--max-samples", "4", "--max-length", "96", "--no-progress",
               "--decision-units", "--decision-fraction", "2%", "--task-data", str(task), "--conflict-fraction",
               "0.1", "--task-max-samples", "3", "-o", str(out), "--json"])
    assert rc == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["selections"] == {"decision": round(0.02 * 384), "conflict": round(0.1 * 384)}
    mask = Mask.load(out)
    mask.validate(tiny_model("llama"))
    assert mask.method["config"]["decision_units"] and mask.method["config"]["task_max_samples"] == 3
    assert mask.method["selections"]["conflict"]["n_task"] == 3
    assert mask.method["selections"]["conflict"]["task_source"] == str(task)
    assert main(["inspect", str(out), "--json", "--policy", "scu+decision:0.1"]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert rep["frozen"]["decision"]["units"] == 8 and rep["frozen"]["conflict"]["units"] == 38
    assert rep["frozen"]["scu+decision:0.1"]["units"] == sum(int(s.sum()) for s in mask.frozen("scu+decision:0.1"))
    assert set(rep["method"]["selections"]) == {"decision", "conflict"}
    assert main(["inspect", str(out)]) == 0
    text = capsys.readouterr().out
    assert "selection decision: stored top 2.0% (8 units)" in text and "selection conflict" in text


# ======================================================================================== errors
def test_empty_task_data_is_a_clear_error(tmp_path, tok, capsys):
    from ssah_plugin.cli import main

    with pytest.raises(DataError, match="task data is empty"):
        locate(tiny_model("llama"), tok, safety=HARMFUL_PAIRS, utility=BENIGN_PAIRS, task=[], config=_cfg())
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    rc = main(["locate", "--model", "tiny:llama", "--max-samples", "3", "--max-length", "96", "--no-progress",
               "--task-data", str(empty), "-o", str(tmp_path / "m.safetensors")])
    assert rc == 2
    err = capsys.readouterr().err
    assert "task data (--task-data)" in err and "empty" in err
    assert not (tmp_path / "m.safetensors").exists()
    with pytest.raises(DataError, match="task data.*row 0 has no response"):
        locate(tiny_model("llama"), tok, safety=HARMFUL_PAIRS, utility=BENIGN_PAIRS, task=[{"prompt": "hi"}],
               config=_cfg())


def test_fractions_out_of_range(capsys, tmp_path):
    from ssah_plugin.cli import main

    with pytest.raises(ValueError, match="decision_fraction must be a fraction in \\[0, 1\\], got 1.5.*"
                                         "conflict_fraction must be a fraction in \\[0, 1\\], got -0.1"):
        LocateConfig(decision_fraction=1.5, conflict_fraction=-0.1)
    with pytest.raises(ValueError, match="decision_weight must be 'norm' or 'none'"):
        LocateConfig(decision_weight="l2")  # type: ignore[arg-type]
    with pytest.raises(SystemExit):
        main(["locate", "--model", "tiny:llama", "--decision-units", "--decision-fraction", "1.5", "-o",
              str(tmp_path / "m.safetensors")])
    assert "not a fraction in [0, 1]" in capsys.readouterr().err


def test_policy_errors(llama_located):
    _, mask = llama_located
    with pytest.raises(PolicyError, match=r"fraction 1.5 is outside \[0, 1\]"):
        resolve_policy(mask, "decision:1.5")
    with pytest.raises(PolicyError, match=r"'abc' is not a number"):
        resolve_policy(mask, "scu+conflict:abc")
    with pytest.raises(PolicyError, match=r"'' is not a number"):
        resolve_policy(mask, "decision:")


def test_selection_not_in_mask(tok):
    from ssah_plugin.hosts.callback import SSAHCallback

    model = tiny_model("llama")
    plain = locate(model, tok, safety=HARMFUL_PAIRS, utility=BENIGN_PAIRS, config=_cfg())
    assert set(plain.scores) == {"safety", "utility", "safety_z", "utility_z"} and plain.policies == []
    with pytest.raises(PolicyError, match=r"needs the decision selection.*ssah-plugin locate --decision-units"):
        SSAHCallback(plain, policy="scu+decision:0.05")
    with pytest.raises(PolicyError, match=r"needs the conflict selection.*locate --task-data FILE"):
        plain.frozen("conflict")
    with pytest.raises(PolicyError, match=r"needs the conflict-cos selection"):
        plain.frozen("conflict-cos:0.1")
    explicit = Mask.from_units(model, {"model.layers.0.mlp": [1]})
    with pytest.raises(PolicyError, match="needs the decision selection"):
        explicit.frozen("explicit+decision:0.1")


def test_golden_mask_unchanged_by_selection_policies():
    from pathlib import Path

    golden = Path(__file__).parent / "golden" / "mask_v1.safetensors"
    mask = Mask.load(golden)
    with pytest.raises(PolicyError, match="needs the decision selection"):
        mask.frozen("decision:0.1")
    for pol in mask.policies:
        assert _flat(mask.frozen(pol)) == _flat(mask.stored[pol])


def test_layerwise_mode_refuses_selections(tok, tmp_path):
    from ssah_plugin.locate import locate_pretrained

    with pytest.raises(UnsupportedSetupError, match="whole model in memory.*--layerwise off"):
        locate_pretrained("tiny:llama", safety=HARMFUL_PAIRS, utility=BENIGN_PAIRS,
                          config=_cfg(decision_units=True, layerwise="on"))
    with pytest.raises(UnsupportedSetupError, match="whole model in memory"):
        locate_pretrained(str(tmp_path), safety=HARMFUL_PAIRS, utility=BENIGN_PAIRS, task=TASK_PAIRS,
                          config=_cfg(layerwise="on"))
    from ssah_plugin.locate import locate_layerwise

    with pytest.raises(UnsupportedSetupError, match="decision units need the whole model"):
        locate_layerwise(str(tmp_path), safety=HARMFUL_PAIRS, utility=BENIGN_PAIRS, config=_cfg(decision_units=True))


def test_too_few_prompts_for_decision_units(tok):
    with pytest.raises(DataError, match="at least 2 distinct harmful and 2 distinct benign prompts"):
        locate(tiny_model("llama"), tok, safety=[HARMFUL_PAIRS[0], HARMFUL_PAIRS[0]], utility=BENIGN_PAIRS,
               config=_cfg(decision_units=True))
