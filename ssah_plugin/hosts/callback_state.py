"""What :class:`~ssah_plugin.SSAHCallback` records in every checkpoint, and what a resumed run must show first.

Split from :mod:`ssah_plugin.hosts.callback` because it is the callback's contract with its own checkpoints, apart
from the hooks: the record written into ``trainer_state.json`` (``stateful_callbacks.SSAHCallback``) and the two
checks ``on_train_begin`` runs on resume (``state.global_step > 0``), before any step:

1. :func:`check_resume`, before anything is planned: is this run's frozen set the one the checkpoint was trained
   with (a narrower or wider set would freeze values another run trained, or train values it froze)?
2. :func:`check_resumed_values`, after the base-value check: can the frozen values be shown to be the base's (the
   mask's digests), or at least those the checkpointed run froze (the digest of the frozen values it recorded)?

Both raise :class:`~ssah_plugin.errors.ResumeMismatchError` with the cause and the fix. Nothing here runs during
``backward()`` or ``optimizer.step()``; nothing imports transformers (``state`` is read by attribute).
"""
from __future__ import annotations

import logging

from ssah_plugin.core.digest import BaseCheck
from ssah_plugin.core.mask import Mask
from ssah_plugin.errors import ResumeMismatchError

__all__ = ["check_resume", "check_resumed_values", "plugin_record", "saved_record"]

logger = logging.getLogger(__name__)

#: the key under ``trainer_state.json``'s ``stateful_callbacks`` (transformers uses the class name)
STATE_KEY = "SSAHCallback"


def plugin_record(mask: Mask, policy: str, values_digest: str | None = None) -> dict:
    """The record a checkpoint keeps: policy, frozen-set digest, unit count, mask checksum, frozen-values digest."""
    return {"policy": policy, "frozen_set": mask.frozen_set_digest(policy),
            "frozen_units": int(sum(int(s.sum()) for s in mask.frozen(policy))),
            "mask_checksum": mask.checksum, "values_digest": values_digest, "base_checked": False}


def saved_record(state, key: str = STATE_KEY) -> dict | None:
    """The plugin record a resumed checkpoint's ``TrainerState`` holds (``None``: written without the plugin)."""
    saved = getattr(state, "stateful_callbacks", None) or {}
    entry = saved.get(key) if isinstance(saved, dict) else None
    if isinstance(entry, list):
        entry = entry[0] if entry else None
    if not isinstance(entry, dict):
        return None
    record = (entry.get("attributes") or {}).get("record")
    return record if isinstance(record, dict) and record.get("frozen_set") else None


def check_resume(saved: dict | None, now: dict, global_step: int) -> None:
    """Refuse a resume whose checkpoint was trained with another frozen set (``now``: this run's record)."""
    if saved is None:
        return  # written without the plugin: decided by the values (check_resumed_values)
    if saved.get("frozen_set") != now["frozen_set"]:
        was = f"{saved.get('frozen_units')} units under policy {saved.get('policy')!r}"
        raise ResumeMismatchError(
            f"resuming from a checkpoint (step {global_step}) trained with another frozen set: it froze "
            f"{was} (mask {str(saved.get('mask_checksum'))[:12]}), this run freezes {now['frozen_units']} under "
            f"policy {now['policy']!r} (mask {now['mask_checksum'][:12]}); units frozen now but trained before "
            f"would keep their trained values. Fix: resume with the mask and policy the checkpoint was trained "
            f"with (policy={saved.get('policy')!r}), or start from the base model to train with the new ones")
    if saved.get("mask_checksum") != now["mask_checksum"]:
        logger.info("ssah-plugin: resuming with another mask file that freezes the same units")


def check_resumed_values(saved: dict | None, report: BaseCheck | None, check_fingerprint: bool) -> None:
    """After the base check: refuse a resume that cannot be shown to hold the base values (mismatches were raised
    by the base check already)."""
    base_ok = report is not None and report.complete and check_fingerprint
    if base_ok:
        if saved is None:
            logger.info("ssah-plugin: the checkpoint was written without SSAHCallback, but its frozen values "
                        "are exactly the base's: continuing")
        return
    live = report.values_digest if report is not None else None
    if saved is not None and saved.get("values_digest") and saved.get("values_digest") == live:
        return  # same frozen values as when the checkpointed run started
    if saved is None:
        raise ResumeMismatchError(
            "resuming from a checkpoint written without SSAHCallback, and this mask cannot prove that its frozen "
            "values are still the base's (it holds no base digests: a format-1 mask or check_fingerprint=False). "
            "Training on would freeze whatever the earlier run left there. Fix: start from the base model, or "
            "upgrade the mask: Mask.load(path).record_base(base_model).save(path)")
    raise ResumeMismatchError(
        "the frozen values of the resumed checkpoint are not those its run froze (the weights were changed "
        "after that run, or another base model is loaded). Fix: resume the unchanged checkpoint, or start from "
        "the base model")
