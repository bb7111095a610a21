"""Adapters for fine-tuning frameworks that are driven by YAML instead of a Python training script.

* :mod:`ssah_plugin.integrations.axolotl`: an Axolotl plugin (``plugins: [ssah_plugin.integrations.axolotl.SSAHPlugin]``
  with ``ssah_mask:`` / ``ssah_policy:`` in the config).
* :mod:`ssah_plugin.integrations.llamafactory`: LLaMA-Factory's own ``run_exp`` with :class:`~ssah_plugin.SSAHCallback`
  added, reading ``ssah_mask:`` / ``ssah_policy:`` from the same YAML (``python -m
  ssah_plugin.integrations.llamafactory train.yaml``).

Both only build the ordinary :class:`~ssah_plugin.SSAHCallback` and hand it to the framework's ``transformers.Trainer``,
so the guarantees and their limits are those of the callback. Nothing here is imported by ``import ssah_plugin``; the
frameworks themselves are imported only by these modules (each raises :class:`~ssah_plugin.MissingExtraError`, naming
the extra to install, when its framework is missing). Layer: top (next to :mod:`ssah_plugin.cli`); these modules use
only the public names of :mod:`ssah_plugin`.
"""
