"""Task-conflict units: units whose gradient on the user's own training data most opposes the refusal gradient.

Two losses, each the mean cross-entropy over the **response tokens** of its set (the SFT loss; prompts formatted
with the chat template, positions as in :func:`ssah_plugin.data.rows.encode_pairs` with ``tokens="response"``):

* the task loss ``L_T`` on a sample of the user's training data (``locate(..., task=...)``, ``--task-data``);
* the refusal loss ``L_R`` on the safety data (harmful prompts with refusals) that locate calibrates on.

For unit ``u`` let ``g_T,u`` and ``g_R,u`` be the gradients of ``L_T`` and ``L_R`` restricted to the unit's weight
slices (every slice the mask lists for it: MLP ``gate``/``up`` rows, ``down`` column, biases; attention ``o_proj``
column and its value row, shared between the query heads of a KV group under GQA), flattened and concatenated. We
store

    conflict_dot_u = <g_T,u, g_R,u>        conflict_cos_u = conflict_dot_u / (||g_T,u|| ||g_R,u||)  (0 if a norm is 0)

and rank ``conflict:F`` by the **signed dot product**, most negative first. Why the dot product: a small gradient
step on the task, ``dW = -lr * g_T``, changes the refusal loss by ``-lr * <g_T, g_R> + O(lr^2) = -lr * sum_u
conflict_dot_u`` (units partition the unit-bearing weights, up to the shared GQA value rows). Freezing unit ``u``
removes exactly its term, so the units with the most negative dot are those whose training raises the refusal
loss most, to first order. The cosine ignores how large either gradient is (a unit with a tiny, perfectly opposed
gradient scores -1); it is stored and offered as ``conflict-cos:F`` for comparison. Under Adam, whose steps are
closer to sign-like, the cosine may rank better; that is for the study to measure.

Gradients are computed with a full backward pass per batch (model in eval mode: no dropout), accumulated in float32
outside ``param.grad`` (memory: two float32 copies of the unit-bearing weights, one per loss, on their devices);
only the unit-bearing parameters require gradients during the pass. The model's
``requires_grad`` flags, ``.grad`` tensors and training mode are restored afterwards; its weights are never
changed.
"""
from __future__ import annotations

import logging
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ssah_plugin.core.mask import Mask
from ssah_plugin.core.plan import find_weight
from ssah_plugin.core.selections import CONFLICT_COS, CONFLICT_DOT, store_selection
from ssah_plugin.core.units import UnitGroup, unwrap_model
from ssah_plugin.data.rows import EncodedPair, Pair, encode_pairs
from ssah_plugin.errors import DataError, UnsupportedSetupError
from ssah_plugin.io.models import max_positions, model_device, pad_id_of
from ssah_plugin.locate.config import LocateConfig
from ssah_plugin.locate.inputs import as_pairs, length_limit, source_name
from ssah_plugin.locate.stats import batches, n_batches, progress_bar

__all__ = ["loss_gradients", "conflict_scores", "add_conflict_units", "load_task_pairs"]

logger = logging.getLogger(__name__)


def _unit_params(root: nn.Module, groups: Sequence[UnitGroup]) -> dict[str, nn.Parameter]:
    params: dict[str, nn.Parameter] = {}
    for g in groups:
        for s in g.slices:
            if s.name not in params:
                p = find_weight(root, s.module, s.param)
                if p is None:
                    raise UnsupportedSetupError(f"task-conflict units: parameter {s.name} of group {g.name} is not "
                                                "in the model (does the mask match it?)")
                if p.device.type == "meta" or getattr(p, "ds_shape", None) is not None:
                    raise UnsupportedSetupError(
                        f"task-conflict units need the full weights in memory, but {s.name} is not materialised "
                        "(layer-by-layer mode or DeepSpeed ZeRO-3); run locate on the whole model (--layerwise off)")
                params[s.name] = p
    return params


def loss_gradients(model: nn.Module, groups: Sequence[UnitGroup], encoded: Sequence[EncodedPair], *,
                   batch_size: int, pad_id: int, desc: str = "gradients",
                   progress: bool = True) -> tuple[dict[str, torch.Tensor], float]:
    """Gradient of the mean response-token cross-entropy over ``encoded`` w.r.t. every unit-bearing parameter.

    ``encoded`` counts the positions whose next token is a response token (``encode_pairs(tokens="response")``);
    the loss is the sum of their token losses divided by their total number (one mean over the whole set, whatever
    the batching). Returns ``({param name: float32 gradient}, loss)``. One forward and one backward per batch;
    nothing is changed on the model (flags, ``.grad``, training mode restored).
    """
    root = unwrap_model(model)
    params = _unit_params(root, groups)
    total = sum(sum(e.count) for e in encoded)
    if total == 0:
        raise DataError(f"{desc}: no response token to compute the loss on")
    all_params = list(root.parameters())
    flags = [p.requires_grad for p in all_params]
    grads = [p.grad for p in all_params]
    was_training = root.training
    device = model_device(root)
    acc = {name: torch.zeros(p.shape, dtype=torch.float32, device=p.device) for name, p in params.items()}
    loss_sum = 0.0
    try:
        for p in all_params:
            p.requires_grad_(False)
            p.grad = None
        for p in params.values():
            p.requires_grad_(True)
        root.eval()
        for ids, att, cnt in progress_bar(batches(encoded, batch_size, pad_id, device),
                                          n_batches(len(encoded), batch_size), desc, progress):
            logits = root(input_ids=ids, attention_mask=att, use_cache=False).logits
            sel = cnt[:, :-1]  # position t predicts token t + 1
            loss = F.cross_entropy(logits[:, :-1][sel].float(), ids[:, 1:][sel], reduction="sum") / total
            loss.backward()
            loss_sum += float(loss.detach())
            for name, p in params.items():
                if p.grad is not None:
                    acc[name] += p.grad.float()
                    p.grad = None
    finally:
        for p, f, g in zip(all_params, flags, grads):
            p.requires_grad_(f)
            p.grad = g
        root.train(was_training)
    return acc, loss_sum


def _unit_block(grad: torch.Tensor, axis: int, index: torch.Tensor) -> torch.Tensor:
    """``[n_units, -1]`` float64: each unit's slices of ``grad`` along ``axis`` (``index`` is ``[n_units, k]``)."""
    n = index.shape[0]
    picked = grad.index_select(axis, index.reshape(-1).to(grad.device))
    return picked.movedim(axis, 0).reshape(n, -1).to(torch.float64)


def conflict_scores(groups: Sequence[UnitGroup], g_task: dict[str, torch.Tensor],
                    g_refusal: dict[str, torch.Tensor]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Per group: the signed dot products and cosines of the per-unit gradient blocks (float64, CPU)."""
    dots, coss = [], []
    for g in groups:
        dot = torch.zeros(g.n_units, dtype=torch.float64)
        nt = torch.zeros(g.n_units, dtype=torch.float64)
        nr = torch.zeros(g.n_units, dtype=torch.float64)
        for s in g.slices:
            a = _unit_block(g_task[s.name], s.axis, s.index)
            b = _unit_block(g_refusal[s.name], s.axis, s.index)
            dot += (a * b).sum(1).cpu()
            nt += a.square().sum(1).cpu()
            nr += b.square().sum(1).cpu()
        denom = (nt * nr).sqrt()
        coss.append(torch.where(denom > 0, dot / torch.where(denom > 0, denom, torch.ones_like(denom)),
                                torch.zeros_like(dot)))
        dots.append(dot)
    return dots, coss


def load_task_pairs(task, cfg: LocateConfig) -> list[Pair]:
    """The task sample: ``cfg.task_max_samples`` rows (seeded) of a file / ``shipped:`` / hub name / list of rows or
    ``(prompt, response)`` tuples; :class:`DataError` naming the task data for anything empty or unusable."""
    if isinstance(task, (list, tuple)) and not task:
        raise DataError("task data is empty: give prompt/response rows of your training data (--task-data FILE)")
    try:
        return as_pairs(task, what="task", prompt_field=cfg.task_prompt_field,
                        response_field=cfg.task_response_field, input_field=cfg.task_input_field,
                        max_samples=cfg.task_max_samples, seed=cfg.seed)
    except DataError as exc:
        raise DataError(f"task data (--task-data): {exc}") from None


def add_conflict_units(model: nn.Module, tokenizer, mask: Mask, safety_pairs: Sequence[Pair], task,
                       cfg: LocateConfig) -> Mask:
    """Score task-conflict units and add them to ``mask`` in place (scores ``conflict_dot`` / ``conflict_cos``,
    stored set ``conflict`` = the ``cfg.conflict_fraction`` most negative ``conflict_dot``,
    ``method["selections"]["conflict"]``). Two forward + backward passes per batch set; weights unchanged."""
    root = unwrap_model(model)
    task_pairs = load_task_pairs(task, cfg)
    limit = length_limit(cfg.max_length, max_positions(root))
    enc_t = encode_pairs(tokenizer, task_pairs, tokens="response", max_length=limit, where="task data")
    enc_r = encode_pairs(tokenizer, list(safety_pairs), tokens="response", max_length=limit, where="safety data")
    pad = pad_id_of(tokenizer)
    g_t, loss_t = loss_gradients(root, mask.groups, enc_t, batch_size=cfg.batch_size, pad_id=pad,
                                 desc="conflict task", progress=cfg.progress)
    g_r, loss_r = loss_gradients(root, mask.groups, enc_r, batch_size=cfg.batch_size, pad_id=pad,
                                 desc="conflict refusal", progress=cfg.progress)
    dots, coss = conflict_scores(mask.groups, g_t, g_r)
    del g_t, g_r
    flat = torch.cat(dots)
    method = {
        "task_source": source_name(task), "n_task": len(enc_t), "task_tokens": sum(sum(e.count) for e in enc_t),
        "n_refusal": len(enc_r), "refusal_tokens": sum(sum(e.count) for e in enc_r),
        "task_loss": loss_t, "refusal_loss": loss_r,
        "score": "<g_task_u, g_refusal_u> over the unit's slices (conflict_dot); cosine stored as conflict_cos",
        "losses": "mean cross-entropy over response tokens of each set (chat template)",
        "n_negative_dot": int((flat < 0).sum()), "total_dot": float(flat.sum()),
    }
    store_selection(mask, "conflict", {CONFLICT_DOT: dots, CONFLICT_COS: coss}, CONFLICT_DOT, -1.0,
                    cfg.conflict_fraction, method)
    logger.info("task-conflict units: %d task / %d refusal rows; %d of %d units have a negative dot; stored %d",
                len(enc_t), len(enc_r), method["n_negative_dot"], flat.numel(),
                mask.method["selections"]["conflict"]["stored_units"])
    return mask
