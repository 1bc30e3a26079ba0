"""Gradient-inversion attacks, leakage metrics and the privacy audit (see issue: attack suite)."""
