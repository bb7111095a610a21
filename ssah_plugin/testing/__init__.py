"""Test support shared by the suite; only tests import this package.

* :mod:`ssah_plugin.testing.oracles`: independent reference computations (dense boolean masks built from the mask
  file's indices, hand masking / restore, unbatched greedy decoding) that the tests compare the plugin against.
* :mod:`ssah_plugin.testing.data`: small seeded inputs (token batches, a language-modelling dataset, prompt/reply
  rows and their padding collator).
* :mod:`ssah_plugin.testing.trainers`: the transformers ``Trainer`` reference (hand masking after ``backward``, hand
  restore after ``optimizer.step()``).
* :mod:`ssah_plugin.testing.fixtures`: the pytest plugin (``torch_device``, ``deterministic``, ``tiny_llama``, the
  ``cuda`` / ``multi_gpu`` markers), loaded by ``tests/conftest.py`` through ``pytest_plugins``.

Importing this package imports nothing (no pytest, no transformers); the tiny models stay in
:mod:`ssah_plugin.io.tiny` (the demo uses them too).
"""
