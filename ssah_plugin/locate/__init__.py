"""Locate safety-critical units: statistics of a model's units on safety and utility data, scores, classes.

Modules (each imports only from the ones above it in this list, and from lower layers):

* :mod:`~ssah_plugin.locate.config`: :class:`LocateConfig` (method fields, recorded in the mask; runtime fields);
* :mod:`~ssah_plugin.locate.inputs`: calibration data (sampling, own refusals, tokenisation);
* :mod:`~ssah_plugin.locate.stats`: forward pre-hooks and running per-channel moments;
* :mod:`~ssah_plugin.locate.scores`: fluctuation scores, standardisation, classes, the mask;
* :mod:`~ssah_plugin.locate.ablation`: zeroing units in place and restoring them (Table 1);
* :mod:`~ssah_plugin.locate.auto_sizes`: class sizes by an ablation sweep;
* :mod:`~ssah_plugin.locate.decision`, :mod:`~ssah_plugin.locate.conflict`: the extra unit selections;
* :mod:`~ssah_plugin.locate.layerwise`: one decoder layer in memory at a time;
* :mod:`~ssah_plugin.locate.runner`: the entry points :func:`locate` and :func:`locate_pretrained`.
"""
from ssah_plugin.locate.ablation import ablated_copy, ablation_study, restore_units, zero_units
from ssah_plugin.locate.auto_sizes import auto_sizes, choose_sizes, measure
from ssah_plugin.locate.config import DEFAULT_SHIPPED_SAFETY, DEFAULT_SHIPPED_UTILITY, LocateConfig
from ssah_plugin.locate.inputs import prepare_data
from ssah_plugin.locate.layerwise import locate_layerwise
from ssah_plugin.locate.runner import locate, locate_pretrained
from ssah_plugin.locate.scores import build_mask, channel_scores, classify, reclassify, standardize, unit_scores
from ssah_plugin.locate.stats import ChannelStats, StatsCollector, batches, collect_stats

__all__ = [
    "LocateConfig",
    "locate",
    "locate_pretrained",
    "locate_layerwise",
    "DEFAULT_SHIPPED_SAFETY",
    "DEFAULT_SHIPPED_UTILITY",
    "prepare_data",
    "ChannelStats",
    "StatsCollector",
    "batches",
    "collect_stats",
    "channel_scores",
    "unit_scores",
    "standardize",
    "classify",
    "build_mask",
    "reclassify",
    "zero_units",
    "restore_units",
    "ablated_copy",
    "ablation_study",
    "measure",
    "choose_sizes",
    "auto_sizes",
]
