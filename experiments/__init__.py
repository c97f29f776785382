"""The paper's small-scale reproduction, run with the library and kept apart from it: `python -m experiments`.

`plan` says what runs (widths, models, seeds, the learning-rate sweep), `runner` runs it (side by side, resumable,
one record per run) through the library's Python API, `report` turns the records into results.md and plots. It lives
in the repository, not in the installed package: the library never imports it.
"""
