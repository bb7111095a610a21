"""Training recipes that keep refusals: own-refusal replay and the token-wise constrained objective."""
