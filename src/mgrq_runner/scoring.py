"""Evaluation: top-1/top-5 of several models on one pass over the data, agreement with a reference, throughput."""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
from torch import nn

from mgrq_runner.errors import NumericalError


@dataclass
class EvalResult:
    """Accuracy (percent), agreement with the reference model's top-1 (fraction) and forward throughput."""

    top1: float
    top5: float
    agreement: float
    num_images: int
    images_per_second: float
    predictions: torch.Tensor = field(repr=False)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def evaluate(
    models: dict[str, nn.Module],
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    device: torch.device,
    reference: str | None = None,
) -> dict[str, EvalResult]:
    """Runs every model on every batch (images are decoded once) and scores them.

    Args:
        models: models to evaluate, by name, already on ``device`` and in eval mode.
        batches: ``(images, labels)`` batches.
        device: the models' device.
        reference: name of the model whose top-1 predictions the others' ``agreement`` is measured against
            (defaults to the first model).

    Raises:
        NumericalError: a model produced NaN or infinite logits.
    """
    reference = reference or next(iter(models))
    correct1 = dict.fromkeys(models, 0)
    correct5 = dict.fromkeys(models, 0)
    seconds = dict.fromkeys(models, 0.0)
    predictions: dict[str, list[torch.Tensor]] = {name: [] for name in models}
    total = 0
    for images, labels in batches:
        images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
        for name, model in models.items():
            _sync(device)
            start = time.perf_counter()
            logits = model(images)
            _sync(device)
            seconds[name] += time.perf_counter() - start
            if not torch.isfinite(logits).all():
                raise NumericalError(
                    f"model '{name}' produced NaN/inf logits at image {total}. Fix: check the "
                    "quantizer ranges (a zero scale) or the input normalisation."
                )
            top5 = logits.topk(min(5, logits.shape[1]), dim=1).indices
            hits = top5 == labels[:, None]
            correct1[name] += int(hits[:, 0].sum())
            correct5[name] += int(hits.any(dim=1).sum())
            predictions[name].append(top5[:, 0].cpu())
        total += labels.shape[0]
    if total == 0:
        raise ValueError("evaluation got no images")
    preds = {name: torch.cat(p) for name, p in predictions.items()}
    return {
        name: EvalResult(
            top1=100.0 * correct1[name] / total,
            top5=100.0 * correct5[name] / total,
            agreement=float((preds[name] == preds[reference]).float().mean()),
            num_images=total,
            images_per_second=total / max(seconds[name], 1e-9),
            predictions=preds[name],
        )
        for name in models
    }
