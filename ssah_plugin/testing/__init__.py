"""Tiny models and oracles shared by the test suite and the demo."""
