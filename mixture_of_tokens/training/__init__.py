"""Pretraining: `mot train`, its Trainer subclass, routing telemetry, the tokenizer and the CPU memory setting."""
