"""Deployment formats of a quantized model, each written into the run dir and read back by ``mode=eval``.

- ``safetensors_export``: the integer weight codes, every quantizer's grid and the rest of the state
  (``quantized_model.safetensors``) with a manifest (``quantized_model.json``); an exact reload without calibration.
- ``onnx_export``: ``model.onnx`` with QuantizeLinear/DequantizeLinear on the run's own grids, and an onnxruntime
  model to evaluate it (the ``deploy`` extra).

A layer's codes and grid come from ``quant.codes``, so both formats carry the same integers.
"""
