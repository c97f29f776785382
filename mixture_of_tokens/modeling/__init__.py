"""The model: configuration, modeling, its performance paths and a naive reference of the MoT layer.

These files import each other and installed packages only, never the rest of `mixture_of_tokens`: the first three
travel to the Hub as custom code (`trust_remote_code=True`). This `__init__` imports nothing, so that reading the
configuration does not load the model.
"""
