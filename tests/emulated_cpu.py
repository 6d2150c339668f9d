"""onnxruntime on an emulated x86 CPU without VNNI, so that its AVX2 integer kernels run on any x86 test machine.

onnxruntime picks its integer matrix kernels from CPUID. On AVX2 (and AVX-512 without VNNI) its u8 x s8 kernel
sums each pair of neighbouring products in saturating 16-bit arithmetic (``vpmaddubsw``); with VNNI it sums them
in 32 bits. qemu-user (``apt-get install qemu-user``) runs this machine's Python and onnxruntime under a CPU model
that has AVX2 and no AVX-512 or VNNI, so the AVX2 kernels run, instruction for instruction, whatever the host has.

As a script (it imports only numpy and onnxruntime: under emulation every import costs):

    python tests/emulated_cpu.py model.onnx images.npy logits.npy [session.config.key=value ...]
"""

from __future__ import annotations

import platform
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np

QEMU = shutil.which("qemu-x86_64")
# AMD Zen 3 (family 25, model 1): AVX2, no AVX-512, no VNNI, the machine type where the 16-bit sums first showed
AVX2_CPU = "EPYC-Milan"
AVAILABLE = platform.machine() == "x86_64" and QEMU is not None


def run_on_avx2(model: Path, inputs: np.ndarray, tmp: Path, config: dict[str, str] | None = None) -> np.ndarray:
    """The outputs of ``model`` on ``inputs`` under onnxruntime's default session with the session ``config``
    entries (none: a plain session), on the emulated AVX2 CPU."""
    assert QEMU is not None
    tmp.mkdir(parents=True, exist_ok=True)
    np.save(tmp / "inputs.npy", inputs)
    entries = [f"{key}={value}" for key, value in (config or {}).items()]
    command = [QEMU, "-cpu", AVX2_CPU, sys.executable, __file__, str(model), str(tmp / "inputs.npy")]
    command += [str(tmp / "out.npy"), *entries]
    done = subprocess.run(command, capture_output=True, text=True, timeout=900)
    if done.returncode != 0:
        raise RuntimeError(f"onnxruntime under qemu failed ({done.returncode}): {done.stderr[-2000:]}")
    return np.load(tmp / "out.npy")


def avx2_u8s8_products(activations: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """``activations @ weights`` (uint8 codes [M, K] times int8 codes [K, N]) as the AVX2 kernel sums it: each pair
    of neighbouring products along K clipped to int16, the pairs summed in int32."""
    a, w = activations.astype(np.int64), weights.astype(np.int64)
    if a.shape[1] % 2:
        a, w = np.pad(a, ((0, 0), (0, 1))), np.pad(w, ((0, 1), (0, 0)))
    pairs = a[:, 0::2, None] * w[None, 0::2, :] + a[:, 1::2, None] * w[None, 1::2, :]
    return np.clip(pairs, -(2**15), 2**15 - 1).sum(axis=1)


def main(model: str, inputs: str, out: str, *entries: str) -> None:
    import onnxruntime as ort

    options = ort.SessionOptions()  # onnxruntime's defaults otherwise: what a user's plain session runs
    options.intra_op_num_threads = 1
    for entry in entries:
        options.add_session_config_entry(*entry.split("=", 1))
    session = ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])
    images, name = np.load(inputs), session.get_inputs()[0].name
    batches = np.array_split(images, max(1, len(images) // 256))  # bounded memory on a whole test split
    np.save(out, np.concatenate([session.run(None, {name: batch})[0] for batch in batches]))


if __name__ == "__main__":
    main(*sys.argv[1:])
