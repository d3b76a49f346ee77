"""Experiment scripts that reproduce the paper's comparisons at CPU scale (issue 8)."""
