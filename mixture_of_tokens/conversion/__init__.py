"""Conversion: `mot convert` and `mot transition`, Llama import, stock-architecture and GGUF export."""
