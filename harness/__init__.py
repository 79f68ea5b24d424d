"""The instruction-tuning benchmark harness: run SFT recipes under one protocol and compare them."""

__version__ = "0.1.0"
