"""Trains a proxy (ViT or Swin) on Fashion-MNIST train on the CPU and writes the weights shipped in the package.

    python scripts/train_proxy.py                    # the shipped ViT weights: seed 0, 30 epochs, CPU
    python scripts/train_proxy.py --model proxy_swin --epochs 12 --threads 1   # the shipped Swin weights
    python scripts/train_proxy.py --epochs 1 --out /tmp/proxy.safetensors

Recipe: AdamW, one warm-up epoch then cosine decay, label smoothing 0.1, random shifts of up to 2 pixels (no
flips: every shoe in Fashion-MNIST points the same way). No hyperparameter was tuned on the test split; it is
evaluated once, at the end.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import shlex
import sys
import time
from pathlib import Path

import timm
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from mgrq_runner.data import load_fashion_mnist
from mgrq_runner.models import PROXIES, PROXY_NAME, create_proxy_model


def augment(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Random shifts of up to 2 pixels, padded with the background value."""
    batch = images.shape[0]
    padded = F.pad(images[:, 0], (2, 2, 2, 2), value=float(images.min()))
    offsets = torch.randint(0, 5, (batch, 2), generator=generator).to(images.device)  # CPU draws on any device
    pixels = torch.arange(28, device=images.device)
    rows = (offsets[:, 0:1] + pixels)[:, :, None]
    cols = (offsets[:, 1:2] + pixels)[:, None, :]
    return padded[torch.arange(batch, device=images.device)[:, None, None], rows, cols].unsqueeze(1)


@torch.no_grad()
def accuracy(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor, batch: int = 1000) -> float:
    model.eval()
    correct = sum(
        (model(images[i : i + batch]).argmax(1) == labels[i : i + batch]).sum().item()
        for i in range(0, len(images), batch)
    )
    return 100.0 * correct / len(images)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=PROXY_NAME, choices=sorted(PROXIES))
    parser.add_argument("--root", default="/usr/share/datasets/fashion-mnist")
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--weight-decay", type=float, default=0.05)
    parser.add_argument("--drop-path", type=float, default=0.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu", help="the shipped weights were trained on the CPU")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--out", type=Path, default=None, help="default: the package's weights of --model")
    args = parser.parse_args()
    proxy = PROXIES[args.model]
    out = args.out or proxy.weights

    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    generator = torch.Generator().manual_seed(args.seed)
    train_images, train_labels = load_fashion_mnist(args.root, "train").tensors
    test_images, test_labels = load_fashion_mnist(args.root, "test").tensors

    device = torch.device(args.device)
    train_images, train_labels = train_images.to(device), train_labels.to(device)
    test_images, test_labels = test_images.to(device), test_labels.to(device)
    model = create_proxy_model(args.model, pretrained=False, drop_path_rate=args.drop_path).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    steps_per_epoch = math.ceil(len(train_images) / args.batch_size)
    total_steps, warmup_steps = args.epochs * steps_per_epoch, steps_per_epoch

    def lr_factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        return 0.5 * (1 + math.cos(math.pi * (step - warmup_steps) / max(1, total_steps - warmup_steps)))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)
    start = time.time()
    for epoch in range(args.epochs):
        model.train()
        order = torch.randperm(len(train_images), generator=generator).to(device)
        running = 0.0
        for step in range(steps_per_epoch):
            idx = order[step * args.batch_size : (step + 1) * args.batch_size]
            images = augment(train_images[idx], generator)
            loss = F.cross_entropy(model(images), train_labels[idx], label_smoothing=0.1)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            running += loss.item()
        print(
            f"epoch {epoch + 1}/{args.epochs} loss {running / steps_per_epoch:.4f} elapsed {time.time() - start:.0f}s",
            flush=True,
        )

    top1 = accuracy(model, test_images, test_labels)
    train_seconds = time.time() - start
    print(f"Fashion-MNIST test top-1: {top1:.2f}% ({train_seconds:.0f}s of training)")
    out.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous().cpu() for k, v in model.state_dict().items()}, str(out))
    card = {
        "command": " ".join(["python scripts/train_proxy.py", *map(shlex.quote, sys.argv[1:])]),
        "seed": args.seed,
        "epochs": args.epochs,
        "batch_size": args.batch_size,
        "lr": args.lr,
        "weight_decay": args.weight_decay,
        "drop_path": args.drop_path,
        "model": args.model,
        "architecture": proxy.arch,
        "test_top1": round(top1, 2),
        "train_seconds": round(train_seconds),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "timm": timm.__version__,
        "machine": platform.machine(),
        "device": str(device),
        "param_count": sum(p.numel() for p in model.parameters()),
    }
    out.with_suffix(".json").write_text(json.dumps(card, indent=2) + "\n")


if __name__ == "__main__":
    main()
