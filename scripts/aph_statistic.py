"""APHQ-ViT's perturbation Hessian statistic on the shipped ViT proxy: what it measures.

    python scripts/aph_statistic.py              # float32, 256 calibration images
    python scripts/aph_statistic.py --float64

For every unit but the head: how far a shift of every element of the unit's FP output by 1e-6 and by 1.0 moves the
logits (a pre-LN ViT's LayerNorms remove it), then the statistic H (recon/losses/hessian.py) from APHQ-ViT's
finite difference and from the exact Hessian-vector product: their means, correlation and the share of exact zeros.
A statistic that falls with the precision is rounding, not curvature (docs/method.md section 9.2).
"""

from __future__ import annotations

import argparse

import torch

from mgrq_runner.data import load_fashion_mnist
from mgrq_runner.models import create_proxy_model
from mgrq_runner.recon.cache import batched, fp_logits
from mgrq_runner.recon.config import LossConfig, ReconConfig
from mgrq_runner.recon.losses import UnitContext, create_block_distance
from mgrq_runner.recon.units import fp_remainder, model_units

DATA = "/usr/share/datasets/fashion-mnist"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--float64", action="store_true", help="the model and images in float64")
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--data", default=DATA)
    args = parser.parse_args()
    torch.set_num_threads(1)
    dtype = torch.float64 if args.float64 else torch.float32
    images = load_fashion_mnist(args.data, "train").tensors[0][: args.images].to(dtype)
    model = create_proxy_model().eval().to(dtype)
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    units = model_units(model)
    logits = fp_logits(units, images, False, 32)
    print(f"ViT proxy, {dtype}, {args.images} images, one thread")
    x = images
    for index, unit in enumerate(units[:-1]):
        output = batched(unit, x, 32)
        rest = fp_remainder(units, index, False)
        with torch.no_grad():
            base = rest(output[:32])
            moved = {shift: (rest(output[:32] + shift) - base).abs().max().item() for shift in (1e-6, 1.0)}
        statistic = {}
        for how in ("finite_difference", "exact"):
            losses = LossConfig(block_distance="aph", aph_hessian=how)
            context = UnitContext(unit, x, output, rest, logits, ReconConfig(batch_size=32), losses)
            statistic[how] = create_block_distance("aph", context).hessian.flatten()
        fd, exact = statistic["finite_difference"], statistic["exact"]
        correlation = torch.corrcoef(torch.stack([fd, exact]))[0, 1].item()
        print(
            f"{unit.name:9s} logits moved by {moved[1e-6]:.1e} (shift 1e-6), {moved[1.0]:.1e} (shift 1)  "
            f"H mean: finite difference {fd.mean():.2e}, exact {exact.mean():.2e}; correlation {correlation:.2f}; "
            f"finite-difference zeros {(fd == 0).double().mean():.1%}"
        )
        x = output


if __name__ == "__main__":
    main()
