"""mgrq-runner: config-driven post-training quantization of Vision Transformers (MGRQ and its baselines)."""

__version__ = "0.1.0"
