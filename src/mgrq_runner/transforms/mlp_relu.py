"""APHQ-ViT-style MLP reconstruction: every transformer MLP's GELU becomes a ReLU, then fc1/fc2 are re-trained.

Why: with a ReLU before fc2, fc2's input is never negative, so its activation quantizer spends no levels on
GELU's small negative tail. The swap changes the function, so each MLP's fc1 and fc2 are re-trained in full
precision (no quantization anywhere) to reproduce the original GELU MLP's output on the calibration images,
one block after another in forward order, before any quantization happens.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable

import torch
from timm.layers import Mlp
from timm.layers.activations import GELU as TimmGELU
from timm.layers.activations import GELUTanh as TimmGELUTanh
from timm.models.swin_transformer import SwinTransformer
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from mgrq_runner.errors import ModelError, NumericalError
from mgrq_runner.recon.units import model_units
from mgrq_runner.transforms.config import MlpReluConfig

# The activations that count as "the original GELU": torch's and timm's own (``act_layer="gelu"`` builds timm's).
GELU_TYPES = (nn.GELU, TimmGELU, TimmGELUTanh)
OnStep = Callable[[str, int, float, int], None]


def mlp_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Every transformer block's MLP in forward order, as ``(name, module)`` with the names of
    ``model.named_modules()``: ``blocks.<i>.mlp`` (ViT, DeiT) or ``layers.<i>.blocks.<j>.mlp`` (Swin).

    Each must be a timm ``Mlp`` (fc1 -> act -> fc2) whose act is a GELU, or a ReLU already swapped in;
    anything else (GluMlp, SwiGLU, another activation) raises ModelError before anything is changed.
    """
    if isinstance(model, VisionTransformer):
        blocks = [(f"blocks.{i}", block) for i, block in enumerate(model.blocks)]
    elif isinstance(model, SwinTransformer):
        blocks = [
            (f"layers.{i}.blocks.{j}", block)
            for i, stage in enumerate(model.layers)
            for j, block in enumerate(stage.blocks)
        ]
    else:
        raise ModelError(
            f"the GELU -> ReLU MLP reconstruction supports timm VisionTransformer and SwinTransformer, not "
            f"{type(model).__name__}. Fix: method.init.mlp_relu=false."
        )
    mlps = []
    for name, block in blocks:
        mlp = getattr(block, "mlp", None)
        if type(mlp) is not Mlp or not isinstance(mlp.act, (*GELU_TYPES, nn.ReLU)):
            what = type(mlp).__name__ if type(mlp) is not Mlp else f"a timm Mlp with {type(mlp.act).__name__}"
            raise ModelError(
                f"{name}.mlp is {what}, but the GELU -> ReLU MLP reconstruction needs a timm Mlp "
                "(fc1 -> GELU -> fc2). Fix: method.init.mlp_relu=false."
            )
        mlps.append((f"{name}.mlp", mlp))
    return mlps


def swap_gelu_for_relu_(model: nn.Module) -> int:
    """Structure only: every MLP's GELU becomes an ``nn.ReLU`` (weights untouched), as when an exported model
    that was reconstructed with ReLUs is rebuilt. Returns how many MLPs were swapped (those already ReLU are
    left as they are and not counted)."""
    swapped = 0
    for _, mlp in mlp_modules(model):
        if not isinstance(mlp.act, nn.ReLU):
            mlp.act = nn.ReLU()
            swapped += 1
    return swapped


def relu_mlps_(
    model: nn.Module,
    images: torch.Tensor,
    config: MlpReluConfig,
    seed: int,
    on_step: OnStep | None = None,
) -> list[dict[str, float | str]]:
    """Swaps every MLP's GELU for a ReLU and re-trains its fc1/fc2 to reproduce the GELU MLP's output.

    Args:
        model: a full-precision timm ViT/DeiT/Swin in eval mode, changed in place.
        images: the calibration images ``[N, C, H, W]``, on the model's device.
        config: steps, learning rate and batch size of the re-training.
        seed: MLP ``k`` draws its mini-batches from a generator seeded with ``seed + k``.
        on_step: called as ``on_step(mlp_name, step, batch_loss, total_steps)`` every 10 steps.

    MLPs are handled in forward order: the inputs of MLP ``k`` are computed by the model as transformed so far
    (MLPs ``0..k-1`` already ReLU and re-trained), its targets are the original GELU MLP's outputs on those same
    inputs. Returns one record per MLP: ``mlp``, ``loss_swap`` (MSE over the calibration set right after the
    swap), ``loss_final`` (after re-training), ``target_energy`` (mean square of the targets, so
    ``loss / target_energy`` is a relative error) and ``seconds``. Every parameter's ``requires_grad`` is
    restored afterwards and the model is left in eval mode.
    """
    mlps = mlp_modules(model)
    for name, mlp in mlps:
        if not isinstance(mlp.act, GELU_TYPES):
            raise ModelError(
                f"{name} already has a {type(mlp.act).__name__}: the MLP reconstruction needs the original GELU "
                "model. Fix: start from the FP model's weights."
            )
    requires_grad = [(p, p.requires_grad) for p in model.parameters()]
    model.eval()
    model.requires_grad_(False)
    records = []
    try:
        with torch.no_grad():
            x = images  # the current unit's input on all calibration images
            pending = list(mlps)
            for unit in model_units(model)[:-1]:  # the head holds no MLP
                if not pending:
                    break
                inside = {id(m) for m in unit.module.modules()}
                while pending and id(pending[0][1]) in inside:
                    name, mlp = pending.pop(0)
                    start = time.perf_counter()
                    inputs, targets = _mlp_inputs_and_outputs(unit.module, mlp, x, config.batch_size, name)
                    mlp.act = nn.ReLU()
                    record = {"mlp": name, "loss_swap": _mse(mlp, inputs, targets, config.batch_size)}
                    with torch.enable_grad():
                        _train(mlp, inputs, targets, config, seed + len(records), name, on_step)
                    record["loss_final"] = _mse(mlp, inputs, targets, config.batch_size)
                    record["target_energy"] = _mean_square(targets, config.batch_size)
                    record["seconds"] = time.perf_counter() - start
                    if not math.isfinite(record["loss_final"]):
                        raise NumericalError(
                            f"the ReLU MLP reconstruction of {name} diverged (loss {record['loss_final']}). "
                            f"Fix: a smaller method.init.mlp_relu_lr (now {config.lr})."
                        )
                    records.append({k: _round(v) if isinstance(v, float) else v for k, v in record.items()})
                if pending:
                    x = torch.cat([unit(batch) for batch in x.split(config.batch_size)])
        if pending:  # a block outside the units: a bug, not the user's
            raise RuntimeError(f"MLPs {[name for name, _ in pending]} were not reached by the model's units")
    finally:
        for parameter, flag in requires_grad:
            parameter.requires_grad_(flag)
        model.eval()
    return records


def _mlp_inputs_and_outputs(
    unit: nn.Module, mlp: nn.Module, x: torch.Tensor, batch_size: int, name: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """The MLP's inputs and (still GELU) outputs while ``unit`` runs on ``x``, concatenated over images (dim 0).
    Whatever shape the MLP sees (``[B, L, C]``, or ``[B, H, W, C]`` in some Swin versions) is kept."""
    seen: list[tuple[torch.Tensor, torch.Tensor]] = []
    hook = mlp.register_forward_hook(lambda _m, args, out: seen.append((args[0].detach(), out.detach())))
    try:
        for batch in x.split(batch_size):
            calls = len(seen)
            unit(batch)
            if len(seen) != calls + 1 or seen[-1][0].shape[0] != batch.shape[0]:
                raise ModelError(
                    f"{name} did not run once on each batch's images (ran {len(seen) - calls} times). "
                    "Fix: method.init.mlp_relu=false."
                )
    finally:
        hook.remove()
    return torch.cat([s[0] for s in seen]), torch.cat([s[1] for s in seen])


def _train(
    mlp: nn.Module,
    inputs: torch.Tensor,
    targets: torch.Tensor,
    config: MlpReluConfig,
    seed: int,
    name: str,
    on_step: OnStep | None,
) -> None:
    """Adam with a cosine learning rate on fc1/fc2's weights and biases, MSE to the targets on random
    mini-batches of images drawn from a generator seeded with ``seed``."""
    parameters = [p for layer in (mlp.fc1, mlp.fc2) for p in (layer.weight, layer.bias) if p is not None]
    grads = [p.grad for p in parameters]  # whatever the caller had there is put back
    for p in parameters:
        p.requires_grad_(True)
        p.grad = None
    optimizer = torch.optim.Adam(parameters, lr=config.lr)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=config.iters, eta_min=0.0)
    generator = torch.Generator().manual_seed(seed)
    count, batch = inputs.shape[0], min(config.batch_size, inputs.shape[0])
    try:
        for step in range(1, config.iters + 1):
            index = torch.randperm(count, generator=generator)[:batch].to(inputs.device)
            loss = nn.functional.mse_loss(mlp(inputs[index]), targets[index])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            if on_step is not None and (step % 10 == 0 or step == config.iters):
                on_step(name, step, loss.item(), config.iters)
    finally:
        for p, grad in zip(parameters, grads, strict=True):
            p.requires_grad_(False)
            p.grad = grad


def _mse(mlp: nn.Module, inputs: torch.Tensor, targets: torch.Tensor, batch_size: int) -> float:
    """Mean squared error of ``mlp(inputs)`` to ``targets`` over all images (summed in float64)."""
    with torch.no_grad():
        total = sum(
            (mlp(x) - t).double().square().sum()
            for x, t in zip(inputs.split(batch_size), targets.split(batch_size), strict=True)
        )
    return float(total) / targets.numel()


def _mean_square(x: torch.Tensor, batch_size: int) -> float:
    return float(sum(part.double().square().sum() for part in x.split(batch_size))) / x.numel()


def _round(value: float) -> float:
    return float(f"{value:.6g}")
