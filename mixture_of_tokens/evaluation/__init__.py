"""Evaluation: `mot eval` and `mot lm-eval`, the lm-evaluation-harness model, its offline tasks and data."""
