"""Quantization: primitives, quantizers, quantized layers, attention, quantize_, calibration, weight roundings."""
