"""Evaluation: generation, the refusal judge, metrics, attacks, depth signals, verify, reports."""
