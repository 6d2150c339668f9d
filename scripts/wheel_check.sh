#!/usr/bin/env bash
# What `pip install .` gives a user, without the repository beside it: builds the sdist and, from it, the wheel
# (python -m build), installs the wheel into a fresh virtual environment outside the checkout (its dependencies
# resolved by pip from the package index, as for any user), and runs there, from a directory outside the checkout:
#   mgrq-run --version; mgrq-run debug=smoke (20 reconstruction iterations per unit); the Python API example.
# Usage: bash scripts/wheel_check.sh [WORK_DIR]   (default: a new temporary directory, removed at the end)
# PYTHON= the interpreter that builds (default: .venv/bin/python, which has `build` from the dev extras).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
python=${PYTHON:-$root/.venv/bin/python}
if [ $# -gt 0 ]; then work=$1; mkdir -p "$work"; else work=$(mktemp -d); trap 'rm -rf "$work"' EXIT; fi

# build from a copy of the tracked (and new, not ignored) files: setuptools writes build/ and *.egg-info there
mkdir -p "$work/src"
(cd "$root" && git ls-files -z --cached --others --exclude-standard | xargs -0 tar -cf - 2>/dev/null) | tar -xf - -C "$work/src"
"$python" -m build --no-isolation --outdir "$work/dist" "$work/src" > "$work/build.log" 2>&1 || { tail -20 "$work/build.log"; exit 1; }
wheel=$(ls "$work"/dist/*.whl)
echo "built $(cd "$work/dist" && ls)"

base=$("$python" -c 'import sys; print(sys._base_executable)')
"$base" -m venv "$work/venv"
"$work/venv/bin/python" -m pip install -q "$wheel" > "$work/install.log" 2>&1 || { tail -20 "$work/install.log"; exit 1; }

cd "$work"  # outside the checkout: nothing can be imported from it
"$work/venv/bin/python" -c '
import sys, mgrq_runner
location = mgrq_runner.__file__
assert location.startswith(sys.prefix), f"mgrq_runner imported from {location}, not the fresh environment"
print("mgrq_runner from", location)'
"$work/venv/bin/mgrq-run" --version
"$work/venv/bin/mgrq-run" debug=smoke model.recon_iters=20 threads=2 output_dir="$work/smoke" > "$work/smoke.log" 2>&1 \
  || { tail -20 "$work/smoke.log"; exit 1; }
grep -q '"status": "done"' "$work/smoke/results.json"
echo "mgrq-run debug=smoke: done, top-1 $("$work/venv/bin/python" -c "import json; print(json.load(open('$work/smoke/results.json'))['top1'])")"
"$work/venv/bin/python" "$root/examples/quantize_timm_model.py" --out "$work/example" --iters 10 --train-steps 20
echo "wheel check passed"
