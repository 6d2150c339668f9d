#!/usr/bin/env bash
# Issue 12's GPU measurements in one call of a lent GPU machine (the device tool), about 8 minutes of it.
#
#   make device-bundle      # here, once: wheels the GPU machine lacks and Fashion-MNIST, into .device_bundle/
#   device run: command="bash scripts/device_check.sh"  carry=[".device_bundle"]  timeout_s=600
#
# The GPU machine has torch, timm and rich but no network, no hydra-core/omegaconf and no Fashion-MNIST: the
# bundle brings them and the project runs from src/ (no install). Each step has its own time limit, so one that
# hangs costs its limit, not the call. Prints, in order: the GPU; the CUDA-vs-CPU checks (scripts/check_cuda.py);
# bench_recon on CUDA for deit_s (a middle block and the patch embedding, whose EBGS remainder is the whole
# network) and deit_b; the dry-run projection of a full deit_s W4A4 mgrq run (20 000 iterations per unit, 1024
# calibration images: random weights on random JPEGs, which cost what ImageNet costs); peak CUDA memory of a
# deit_b and a swin_b reconstruction at 1024 images; then the proxy's default job on CUDA beside its own dry run
# (the projection checked against a real run). Everything printed is also in $OUT/device_check.log, and the
# three runs' results.json in $OUT.
#
# Off a GPU machine (a check of the script itself): DEVICE=cpu SMALL=1 PY=.venv/bin/python bash scripts/device_check.sh
set -u -o pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/device_check}
DEVICE=${DEVICE:-cuda}
PY=${PY:-python3}
SMALL=${SMALL:-0}  # 1: tiny sizes, to check the plumbing on a CPU in a few minutes
BUNDLE=.device_bundle
mkdir -p "$OUT"
exec > >(tee "$OUT/device_check.log") 2>&1

if [ -d "$BUNDLE/whl" ] && ls "$BUNDLE"/whl/*.whl > /dev/null 2>&1; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/mgrq_site \
        "$BUNDLE"/whl/*.whl || exit 1
    export PYTHONPATH=/tmp/mgrq_site:src
else
    export PYTHONPATH=src
fi
export PYTHONUNBUFFERED=1
DATA=$BUNDLE/fashion-mnist
[ -d "$DATA" ] || DATA=/usr/share/datasets/fashion-mnist

if [ "$SMALL" = 1 ]; then  # deit_tiny and swin_tiny in place of deit_s, deit_b and swin_b
    IMAGES=32 ITERS=2 BENCH_ITERS=2 PROXY_ITERS=20 CLASSES=4
    DEIT_S=deit_tiny_patch16_224 DEIT_B=deit_tiny_patch16_224 SWIN_B=swin_tiny_patch4_window7_224
else
    IMAGES=1024 ITERS=2 BENCH_ITERS=50 PROXY_ITERS=1000 CLASSES=8
    DEIT_S=deit_small_patch16_224 DEIT_B=deit_base_patch16_224 SWIN_B=swin_base_patch4_window7_224
fi

step() {  # step LIMIT_SECONDS TITLE COMMAND...: runs COMMAND under a time limit, says how it ended
    local limit=$1 title=$2
    shift 2
    echo
    echo "=== $title ($(date -u +%H:%M:%S), limit ${limit}s)"
    local start=$SECONDS
    timeout "$limit" "$@"
    local rc=$?
    echo "=== $title: exit $rc after $((SECONDS - start))s"
}

step 30 "machine" bash -c "nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null;
    $PY -c 'import torch, timm; print(\"torch\", torch.__version__, \"timm\", timm.__version__,
        \"cuda\", torch.cuda.is_available())'"

# Random JPEGs in an ImageNet-shaped tree (train/<wnid>/, val/<wnid>/): calibration reads IMAGES of them.
TREE=/tmp/mgrq_imagenet
step 120 "random image tree" "$PY" -c "
from pathlib import Path
from tests.conftest import make_imagenet_tree
import shutil
shutil.rmtree('$TREE', ignore_errors=True)
make_imagenet_tree(Path('$TREE'), classes=list(range($CLASSES)), per_class=$IMAGES // $CLASSES, size=64)
print(sum(1 for _ in Path('$TREE').rglob('*.JPEG')), 'images in $TREE')
"

step 120 "CUDA vs CPU checks" "$PY" scripts/check_cuda.py --data "$DATA" --device "$DEVICE"

BENCH=("$PY" scripts/bench_recon.py --device "$DEVICE" --iters "$BENCH_ITERS")
step 90 "bench_recon $DEIT_S (middle block)" "${BENCH[@]}" --model "$DEIT_S"
step 90 "bench_recon $DEIT_S (patch embedding)" "${BENCH[@]}" --model "$DEIT_S" --unit embed
step 90 "bench_recon $DEIT_B (middle block)" "${BENCH[@]}" --model "$DEIT_B"

RUNS=/tmp/mgrq_runs  # run dirs stay there: $OUT brings back at most 8 files
rm -rf "$RUNS"
RUN=(-m mgrq_runner.cli progress=false "device=$DEVICE")
step 180 "dry run: $DEIT_S W4A4 mgrq, 20 000 iterations per unit" "$PY" "${RUN[@]}" model=deit_s \
    "model.name=$DEIT_S" model.pretrained=false quant=w4a4 method=mgrq "data.root=$TREE" "calib.num_images=$IMAGES" \
    dry_run=true "hydra.run.dir=$RUNS/dry_deit_s"

MEMORY=("$PY" scripts/bench_memory.py --device "$DEVICE" --images "$IMAGES" --project-to 1024 --iters "$ITERS")
step 120 "peak memory: $DEIT_B reconstruction" "${MEMORY[@]}" --model "$DEIT_B"
step 150 "peak memory: $SWIN_B reconstruction" "${MEMORY[@]}" --model "$SWIN_B"

step 60 "dry run: the proxy's default job" "$PY" "${RUN[@]}" "data.root=$DATA" "model.recon_iters=$PROXY_ITERS" \
    dry_run=true "hydra.run.dir=$RUNS/dry_proxy"
step 300 "the proxy's default job" "$PY" "${RUN[@]}" "data.root=$DATA" "model.recon_iters=$PROXY_ITERS" \
    "hydra.run.dir=$RUNS/proxy"
"$PY" - "$RUNS" "$OUT" <<'EOF'
import json
import sys
from pathlib import Path

runs, out = Path(sys.argv[1]), Path(sys.argv[2])
results = {}
for name in ("dry_deit_s", "dry_proxy", "proxy"):
    path = runs / name / "results.json"
    if path.exists():
        results[name] = json.loads(path.read_text())
        (out / f"{name}.json").write_text(json.dumps(results[name], indent=1))
        projection = {k: v for k, v in (results[name].get("projection") or {}).items() if k != "units"}
        print(name, results[name].get("status"), "times", results[name].get("times"), "projection", projection)
if "dry_proxy" in results and "proxy" in results:
    projected = results["dry_proxy"]["projection"]["seconds"]
    real = results["proxy"]["times"]["reconstruct"]
    print(f"proxy reconstruction: projected {projected:.1f} s, real {real:.1f} s ({projected / real - 1:+.0%})")
EOF
