"""Experiments run with the library, apart from it: the paper's reproduction (`mot reproduce`).

`plan` says what runs (widths, models, seeds, the learning-rate sweep), `runner` runs it (side by side, resumable,
one record per run), `report` turns the records into results.md and plots. Nothing in the library imports this.
"""
