"""GPU correctness check: the explicit attention, the reparameterisation and the quantized proxy on CUDA vs CPU.

    python scripts/check_cuda.py [--data /usr/share/datasets/fashion-mnist]

Prints, for timm models with random weights, the largest difference between timm's forward and the explicit
quantizer-off path on CUDA, and the FP change the RepQ reparameterisation causes there; then calibrates the
shipped proxy at W4A4 on the CPU and on CUDA from the same images and compares their predictions.
"""

from __future__ import annotations

import argparse
import copy

import timm
import torch

from mgrq_runner.data import load_fashion_mnist
from mgrq_runner.models import create_proxy_model
from mgrq_runner.quant.api import QuantConfig, quant_layers, quantize_, set_quantization
from mgrq_runner.quant.calibrate import InitConfig, calibrate


@torch.no_grad()
def check_timm_model(name: str, device: torch.device) -> None:
    torch.manual_seed(0)
    reference = timm.create_model(name, pretrained=False).eval().to(device)
    model = quantize_(copy.deepcopy(reference), QuantConfig())
    images = torch.randn(8, 3, 224, 224, device=device)
    expected = reference(images)
    explicit_gap = (model(images) - expected).abs().max().item()
    calibrate(model, [images], 1, InitConfig(), device)
    set_quantization(model, False)
    for _, layer in quant_layers(model):
        layer.unfreeze()
    reparam_error = ((model(images) - expected).norm() / expected.norm()).item()
    print(f"{name:32s} explicit-vs-timm max |diff| {explicit_gap:.2e}   reparam FP rel. error {reparam_error:.2e}")


@torch.no_grad()
def check_proxy(data_root: str, device: torch.device) -> None:
    calibration = load_fashion_mnist(data_root, "train").tensors[0][:32]
    images = load_fashion_mnist(data_root, "test").tensors[0][:2000]
    outputs = {}
    for where in (torch.device("cpu"), device):
        model = quantize_(create_proxy_model().eval(), QuantConfig()).to(where)
        calibrate(model, [calibration], 1, InitConfig(), where)
        outputs[where.type] = model(images.to(where)).cpu()
    cpu, gpu = outputs["cpu"], outputs[device.type]
    agreement = (cpu.argmax(1) == gpu.argmax(1)).float().mean().item()
    print(
        f"proxy W4A4 repq CPU vs {device}: top-1 agreement {agreement:.4f}, "
        f"logit rel. difference {((cpu - gpu).norm() / cpu.norm()).item():.2e}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default="/usr/share/datasets/fashion-mnist")
    parser.add_argument("--device", default="cuda")
    args = parser.parse_args()
    device = torch.device(args.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"torch {torch.__version__}, timm {timm.__version__}, device {name}")
    for name in ("deit_tiny_patch16_224", "vit_small_patch16_224", "swin_tiny_patch4_window7_224"):
        check_timm_model(name, device)
    check_proxy(args.data, device)


if __name__ == "__main__":
    main()
