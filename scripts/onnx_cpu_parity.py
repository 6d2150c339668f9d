"""ONNX parity on two CPUs: this machine's and an emulated AVX2 CPU without VNNI (qemu-user's EPYC-Milan).

For each run dir exported with ``export=onnx`` on a Fashion-MNIST proxy, it scores on the test split the simulated
model (torch), ``model.onnx`` under onnxruntime here, and the same file under onnxruntime on the emulated CPU
(``tests/emulated_cpu.py``: there onnxruntime's u8 x s8 kernel sums product pairs in int16), and prints top-1
and the share of images whose top-1 class equals the simulation's. The emulated session gets the file's
``session_config`` (none for ``export=onnx``), or none with ``--plain`` (what a user's default session runs). The
emulation is slow (minutes per model): ``--images`` takes the first N test images.

    python scripts/onnx_cpu_parity.py outputs/runs/<run> [...] [--images 2000] [--plain]   # from the repo root
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch
from omegaconf import OmegaConf

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from mgrq_runner.data import build_data  # noqa: E402
from mgrq_runner.deploy.onnx_export import OnnxRuntimeModel, cpu_int8_kernels, session_config  # noqa: E402
from mgrq_runner.deploy.safetensors_export import load_quantized, read_manifest  # noqa: E402
from tests import emulated_cpu  # noqa: E402


def predictions(model: torch.nn.Module, images: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([model(batch).argmax(1) for batch in images.split(500)])


def parity(run_dir: Path, images: int, tmp: Path, plain: bool) -> str:
    manifest = read_manifest(run_dir)
    model = load_quantized(run_dir, torch.device("cpu")).eval()
    bundle = build_data(OmegaConf.load(ROOT / "conf/data/fashion_mnist.yaml"), model, int(manifest["num_calib"]), 0)
    test_x, test_y = (tensor[:images] for tensor in bundle.evaluation.tensors)
    simulated = predictions(model, test_x)
    here = predictions(OnnxRuntimeModel(run_dir / "model.onnx", threads=torch.get_num_threads()), test_x)
    config = {} if plain else session_config(run_dir / "model.onnx")
    logits = emulated_cpu.run_on_avx2(run_dir / "model.onnx", test_x.numpy(), tmp / run_dir.name, config)
    emulated = torch.from_numpy(logits).argmax(1)
    top1 = {
        name: 100.0 * float((p == test_y).float().mean())
        for name, p in (("sim", simulated), ("here", here), ("avx2", emulated))
    }
    agree = {name: float((p == simulated).float().mean()) for name, p in (("here", here), ("avx2", emulated))}
    bits = f"W{manifest['w_bits']}A{manifest['a_bits']}"
    return (
        f"| {manifest['model']['name']} | {manifest['method']} | {bits} | {len(test_y)} | {top1['sim']:.2f} "
        f"| {top1['here']:.2f} | {agree['here']:.4f} | {top1['avx2']:.2f} | {agree['avx2']:.4f} |"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dirs", nargs="+", type=Path)
    parser.add_argument("--images", type=int, default=10_000, help="the first N test images (default: all)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--plain", action="store_true", help="emulated sessions without the file's session_config")
    args = parser.parse_args()
    if not emulated_cpu.AVAILABLE:
        sys.exit("needs an x86_64 machine with qemu-user. Fix: apt-get install qemu-user")
    torch.set_num_threads(args.threads)
    here = cpu_int8_kernels()["isa"]
    print(f"here: {here}; emulated: qemu-user {emulated_cpu.AVX2_CPU} (AVX2 without VNNI); {args.threads} thread(s)\n")
    print(
        f"| model | method | bits | images | simulated top-1 | ORT top-1 ({here}) | agreement | ORT top-1 (AVX2) "
        "| agreement |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for run_dir in args.run_dirs:
            print(parity(run_dir, args.images, Path(tmp), args.plain), flush=True)


if __name__ == "__main__":
    main()
