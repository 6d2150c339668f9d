"""Quantize a timm model that lives in memory, score it, export it, load it back: mgrq-runner's Python API.

A small ViT (random initial weights, 10 classes, 32 x 32 inputs) is first trained for a few seconds on generated
images, so that it behaves like a fine-tuned model (well above chance); then it is quantized to W4A4 with MGRQ on a
DataLoader of calibration images, scored against the FP model on held-out generated images, exported, reloaded
and scored again. The tests run this script (tests/test_api.py), so it cannot drift from the API.

    python examples/quantize_timm_model.py --out /tmp/w4a4_example
"""

from __future__ import annotations

import argparse

import timm
import torch
from torch.utils.data import DataLoader, TensorDataset

import mgrq_runner

NUM_CLASSES, SIZE = 10, 32


def generated_images(count: int, seed: int) -> TensorDataset:
    """Images whose class is a fixed random pattern plus noise: learnable, and never the same image twice."""
    patterns = torch.randn(NUM_CLASSES, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(1234))
    generator = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, NUM_CLASSES, (count,), generator=generator)
    noise = torch.randn(count, 3, SIZE, SIZE, generator=generator)
    return TensorDataset(0.15 * patterns[labels] + noise, labels)


def fine_tuned_model(steps: int) -> torch.nn.Module:
    """A small timm ViT trained briefly on generated images (a stand-in for a user's fine-tuned checkpoint)."""
    torch.manual_seed(0)
    model = timm.create_model(
        "vit_tiny_patch16_224", pretrained=False, num_classes=NUM_CLASSES, img_size=SIZE, patch_size=8, depth=2
    )
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    train = DataLoader(generated_images(64 * steps, seed=1), batch_size=64, shuffle=True)
    model.train()
    for images, labels in train:
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(model(images), labels).backward()
        optimizer.step()
    return model.eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="a new directory for the run record and the export")
    parser.add_argument(
        "--iters",
        type=int,
        default=40,
        help="reconstruction iterations per unit (a demo's budget: far too few to converge)",
    )
    parser.add_argument("--train-steps", type=int, default=60, help="training steps of the stand-in model")
    args = parser.parse_args()

    model = fine_tuned_model(args.train_steps)
    calibration = DataLoader(generated_images(128, seed=2), batch_size=32)
    test = DataLoader(generated_images(1000, seed=3), batch_size=250)

    quantized = mgrq_runner.quantize(
        model,
        calibration,
        method="mgrq",
        w_bits=4,
        a_bits=4,
        overrides=[f"model.recon_iters={args.iters}", "model.recon_weight_lr=3e-2"],
        run_dir=f"{args.out}/run",
    )
    units = quantized.record["reconstruction"]
    print(f"reconstructed {len(units)} units in {quantized.record['times']['reconstruct']:.1f} s")
    fp_top1 = mgrq_runner.evaluate(model, test)["top1"]
    quant_top1 = mgrq_runner.evaluate(quantized, test)["top1"]
    print(f"top-1: FP {fp_top1:.2f}, W4A4 mgrq {quant_top1:.2f}")

    quantized.export(f"{args.out}/export")
    reloaded = mgrq_runner.load(f"{args.out}/export", model)  # the FP architecture it came from
    reloaded_top1 = mgrq_runner.evaluate(reloaded, test)["top1"]
    print(f"top-1 after export and reload: {reloaded_top1:.2f}")
    if reloaded_top1 != quant_top1:
        raise SystemExit(f"the reloaded model scores {reloaded_top1}, the quantized one {quant_top1}")


if __name__ == "__main__":
    main()
