#!/usr/bin/env bash
# Sets up everything on a fresh Debian machine: the Fashion-MNIST package and a virtual environment in .venv.
# Idempotent: a finished install leaves .venv/.installed and is not redone.
set -euo pipefail
cd "$(dirname "$0")/.."

# Debian packages: Fashion-MNIST (the proxies' data) and, on x86_64, qemu-user, under which the ONNX tests run
# onnxruntime on an emulated AVX2 CPU without VNNI (tests/emulated_cpu.py)
packages=()
[ -f /usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz ] || packages+=(dataset-fashion-mnist)
[ "$(uname -m)" != x86_64 ] || command -v qemu-x86_64 >/dev/null || packages+=(qemu-user)
if [ ${#packages[@]} -gt 0 ]; then
  sudo=""; [ "$(id -u)" -ne 0 ] && sudo="sudo"
  $sudo apt-get update -qq
  $sudo apt-get install -y -qq "${packages[@]}"
fi

if [ ! -f .venv/.installed ]; then
  python3 -m venv .venv
  .venv/bin/python -m pip install -q --upgrade pip
  .venv/bin/python -m pip install -q torch==2.14.1 torchvision==0.29.1
  .venv/bin/python -m pip install -q -e '.[dev]'
  touch .venv/.installed
fi
