"""Changes of the FP model before quantization, each exact or re-trained to the original's function.

Import from the modules; this file loads none of them (``quant.calibrate`` reads ``rotation.ROTATIONS`` and
``settings`` must not pull the pipeline in):

- ``rotation``: the Hadamard rotation of the residual stream and heads (exact, float64), ``rotate_``;
- ``mlp_relu``: every MLP's GELU -> ReLU and its FP re-training (``swap_gelu_for_relu_``, ``relu_mlps_``);
- ``pipeline``: ``FP_TRANSFORMS``, the registry in order of application; ``apply_fp_transforms`` (a run) and
  ``rebuild_structure`` (loading an export, ``dry_run``'s structure) both go through it.
"""
