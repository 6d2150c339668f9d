"""What a unit is optimised towards, computed once per unit: the FP output and the FP layer outputs for IBLS;
and once per reconstruction, the FP logits (or pre-head features) of every calibration image for EBGS.

The targets are cached for every calibration image on the model's device and indexed by image; tensors that Swin's
window attention computes on ``[images x windows, ...]`` are regrouped per image first (``per_image``).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from mgrq_runner.quant.api import quant_layers, set_quantization
from mgrq_runner.quant.modules import QuantMatMul
from mgrq_runner.recon.losses.mse import block_loss
from mgrq_runner.recon.units import Unit, run_remainder

CapturePoint = tuple[nn.Module, str]  # a module and whether its "input" or "output" is recorded


@dataclass
class UnitTargets:
    """The FP targets of one unit for every calibration image (indexed by image)."""

    output: torch.Tensor  # O: the FP unit's output on X_fp
    layers: list[torch.Tensor]  # FP tensors at the IBLS capture points, per image (``per_image``)
    logits: torch.Tensor | None  # FP logits (or pre-head features) for EBGS; None when it is off


def batched(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, batch: int) -> torch.Tensor:
    """``fn`` applied to ``x`` in mini-batches, without autograd."""
    with torch.no_grad():
        chunks = (fn(x[i : i + batch]) for i in range(0, x.shape[0], batch))
        return _gather(chunks, x.shape[0])


def _gather(chunks: Iterator[torch.Tensor], total: int) -> torch.Tensor:
    """Mini-batch results written into one tensor of ``total`` rows as they come: never a list of them beside
    their concatenation (twice the cache's memory)."""
    first = next(chunks)
    out = first.new_empty((total, *first.shape[1:]))
    out[: first.shape[0]] = first
    done = first.shape[0]
    for chunk in chunks:
        out[done : done + chunk.shape[0]] = chunk
        done += chunk.shape[0]
    return out


def fp_logits(fp_units: list[Unit], images: torch.Tensor, pre_logits: bool, batch: int) -> torch.Tensor:
    """EBGS's targets: the FP model's logits (or pre-head features, ``pre_logits``) of every image."""
    return batched(functools.partial(run_remainder, fp_units, pre_logits), images, batch)


def capture_points(unit: nn.Module, names: tuple[str, ...]) -> list[CapturePoint]:
    """The places in ``unit`` whose tensors IBLS aligns: outputs of the named quantized layers, and the attention
    probabilities (``attn_probs``: the input of ``attn @ v``) or ``attn @ v``'s output (``attn_v``)."""
    points = []
    for name, module in unit.named_modules():
        leaf = name.rsplit(".", 1)[-1]
        if leaf in names and any(True for _ in quant_layers(module)):
            points.append((module, "output"))
        elif isinstance(module, QuantMatMul) and leaf == "matmul_av":
            if "attn_probs" in names:
                points.append((module, "input"))
            if "attn_v" in names:
                points.append((module, "output"))
    return points


def per_image(tensors: list[torch.Tensor], images: int) -> list[torch.Tensor]:
    """Views captured tensors as ``[images, -1, last dim]``, so that targets can be indexed by image.

    Swin's window attention runs on ``[images x windows, ...]`` (image-major): grouping by image keeps each
    image's windows together; a ViT tensor keeps its layout. The last dim (channels) is what IBLS's distances
    reduce over.
    """
    return [t.reshape(images, -1, t.shape[-1]) for t in tensors]


@contextmanager
def capture(points: list[CapturePoint]) -> Iterator[list[torch.Tensor]]:
    """Records the tensors at ``points`` during forward passes, in order."""
    store: list[torch.Tensor] = []
    handles = []
    for module, what in points:
        if what == "input":
            handles.append(module.register_forward_pre_hook(lambda _m, args: store.append(args[0])))
        else:
            handles.append(module.register_forward_hook(lambda _m, _a, out: store.append(out)))
    try:
        yield store
    finally:
        for handle in handles:
            handle.remove()


def fp_outputs(
    unit: Unit, x_fp: torch.Tensor, points: list[CapturePoint], batch: int, layer_dtype: torch.dtype = torch.float32
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The unit's output and the tensors at ``points`` (per image, kept in ``layer_dtype``), with quantization off,
    on the FP input."""
    set_quantization(unit.module, False)
    total = x_fp.shape[0]
    output: torch.Tensor | None = None
    layers: list[torch.Tensor] = []
    with torch.no_grad(), capture(points) as captured:
        for i in range(0, total, batch):
            chunk_output = unit(x_fp[i : i + batch])
            chunk_layers = [t.to(layer_dtype) for t in per_image(captured, chunk_output.shape[0])]
            captured.clear()
            if output is None:  # the caches, allocated once their shapes are known
                output = chunk_output.new_empty((total, *chunk_output.shape[1:]))
                layers = [t.new_empty((total, *t.shape[1:])) for t in chunk_layers]
            output[i : i + batch] = chunk_output
            for cache, chunk_layer in zip(layers, chunk_layers, strict=True):
                cache[i : i + batch] = chunk_layer
    set_quantization(unit.module, True)
    assert output is not None
    return output, layers


def calibration_block_loss(unit: Unit, inputs: torch.Tensor, target: torch.Tensor, batch: int) -> float:
    """The block loss of ``unit`` on all of ``inputs`` against ``target`` (a mean over images)."""
    total = 0.0
    with torch.no_grad():
        for i in range(0, inputs.shape[0], batch):
            chunk = inputs[i : i + batch]
            total += block_loss(unit(chunk), target[i : i + batch]).item() * chunk.shape[0]
    return total / inputs.shape[0]
