"""Block-wise reconstruction (OBWR) with QDrop, global (EBGS) and local (IBLS) supervision, fused losses (MGLF).

Import from the modules; this file loads none of them. The convergence criterion a unit's report is judged by
lives with the results it reads (``mgrq_runner.results``), which the collector imports without torch.

- ``config``: the settings (``ReconConfig``, ``LossConfig``); ``units``: the model split into units (embedding,
  blocks, Swin patch merging, head) and EBGS's FP remainder;
- ``cache``: a unit's FP targets (output, IBLS layer tensors) and the FP logits, for every calibration image;
- ``losses``: block, global, local and rounding terms and their fusion (the roundings: ``quant.rounding``);
- ``optimizer``: one unit's optimisation (``UnitOptimizer``, ``UnitOptimizer.for_unit``, ``Supervision``);
  ``engine``: ``reconstruct``, every unit in order; ``projection``: ``dry_run``'s projected cost;
- ``state``: finished units saved for resuming; ``curves``: per-unit loss curves.
"""
