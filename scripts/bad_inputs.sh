#!/usr/bin/env bash
# Runs mgrq-run on bad inputs and prints, for each, its exit status, the one-line error and the status results.json
# was left with (issue: reliability). Signals, tampered exports and sweeps are in tests/test_robustness.py.
#   bash scripts/bad_inputs.sh [MGRQ_RUN]      (default: mgrq-run on PATH; writes under a temporary directory)
# Every case runs with debug=smoke and 2 reconstruction iterations (SMALL), so that an input a version silently
# accepts costs seconds, not a whole run.
set -u
mgrq_run=${1:-mgrq-run}
python=$(dirname "$(command -v "$mgrq_run")")/python  # the package's own interpreter (it has PIL)
small="debug=smoke method.recon.iters=2"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
printf 'not a checkpoint' > "$tmp/garbage.pth"
printf '\x10\x00\x00\x00\x00\x00\x00\x00{not json' > "$tmp/garbage.safetensors"
printf 'a file' > "$tmp/imagenet.tar"
mkdir -p "$tmp/empty_run" "$tmp/imagenet/train" "$tmp/imagenet/val/n01440764"
printf 'truncated' > "$tmp/imagenet/val/n01440764/bad.JPEG"
mkdir -p "$tmp/pets/train/cat" "$tmp/pets/train/dog" "$tmp/pets/val/cat" "$tmp/empty_class/train/cat" \
  "$tmp/empty_class/train/dog" "$tmp/empty_class/val/cat"  # two classes; empty_class: dog has no images
"$python" -c "from PIL import Image; Image.new('L', (28, 28)).save('$tmp/pets/train/cat/0.png')"
for f in pets/train/dog pets/val/cat empty_class/train/cat empty_class/val/cat; do cp "$tmp/pets/train/cat/0.png" "$tmp/$f/"; done
printf 'train/cat/404.png\n' > "$tmp/list.txt"
cases=(
  "data.root=/no/such/dir model=deit_t model.pretrained=false"
  "data.root=$tmp/imagenet.tar model=deit_t model.pretrained=false"
  "model=deit_t model.pretrained=false data.root=$tmp/imagenet"
  "model.name=deit_nano_patch16_224"
  "model=timm model.name=resnet50.a1_in1k"
  "model=deit_xl"
  "quant.w_bits=9"
  "quant.a_bits=1"
  "+quant.wbits=3"
  "calib.num_images=100000"
  "calib.num_images=0"
  "calib.num_images=-5"
  "calib.num_images=abc"
  "seed=abc"
  "device=banana"
  "device=cuda:3"
  "eval.world_size=two"
  "eval.world_size=0"
  "eval.world_size=64"
  "method.recon.iters=abc"
  "method.recon.iters=0"
  "method.loss.temperature=0"
  "method.loss.local_distance=cosine"
  "method.recon.quant_prob=2"
  "model.checkpoint=$tmp/garbage.pth"
  "model.checkpoint=$tmp/garbage.safetensors"
  "data.root=$tmp/nowhere data.download_dir=null"
  "data.eval_split=test"
  "mode=eval"
  "mode=eval checkpoint=$tmp/empty_run"
  "resume=$tmp/empty_run"
  "data=folder"
  "data=folder data.root=$tmp/nowhere"
  "data=folder data.root=$tmp/empty_class"
  "data=folder data.root=$tmp/pets calib.num_images=2 data.num_eval=null"
  "calib.list=$tmp/missing.txt"
  "data=folder data.root=$tmp/pets calib.list=$tmp/list.txt calib.num_images=null"
)
for args in "${cases[@]}"; do
  rm -rf "$tmp/run"
  # shellcheck disable=SC2086
  out=$($mgrq_run progress=false hydra.run.dir="$tmp/run" $small $args 2>&1)
  status=$?
  # the log line holds the whole message (the console wraps it)
  message=$(printf '%s\n' "$out" | grep -E "\]\[ERROR\] - |^Error|Could not|Traceback" | tail -1 | sed 's/^.*\]\[ERROR\] - //')
  [ -z "$message" ] && message=$(printf '%s\n' "$out" | tail -1)
  left=$(python3 -c "import json,sys; print(json.load(open(sys.argv[1])).get('status'))" "$tmp/run/results.json" 2>/dev/null || echo "no results.json")
  printf -- '| `%s` | %s | %s | %s |\n' "${args//$tmp/\$TMP}" "$status" "${message//$tmp/\$TMP}" "$left"
done
