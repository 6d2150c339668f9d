#!/usr/bin/env bash
# Runs mgrq-run on bad inputs and prints, for each, its exit status and the one-line error (issue: reliability).
#   bash scripts/bad_inputs.sh            (needs the installed package; writes under a temporary directory)
set -u
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
printf 'not a checkpoint' > "$tmp/garbage.pth"
mkdir -p "$tmp/empty_run" "$tmp/imagenet/train" "$tmp/imagenet/val/n01440764"
printf 'truncated' > "$tmp/imagenet/val/n01440764/bad.JPEG"
cases=(
  "data.root=/no/such/dir model=deit_t model.pretrained=false"
  "model=deit_t model.pretrained=false data.root=$tmp/imagenet"
  "model.name=deit_nano_patch16_224"
  "model=deit_xl"
  "quant.w_bits=9"
  "quant.a_bits=1"
  "calib.num_images=100000"
  "model.checkpoint=$tmp/garbage.pth"
  "data.root=$tmp/nowhere data.download_dir=null"
  "method.loss.local_distance=cosine"
  "method.recon.quant_prob=2"
  "data.eval_split=test"
  "mode=eval"
  "mode=eval checkpoint=$tmp/empty_run"
  "resume=$tmp/empty_run"
  "device=cuda:3"
)
for args in "${cases[@]}"; do
  # shellcheck disable=SC2086
  out=$(mgrq-run progress=false hydra.run.dir="$tmp/run" $args 2>&1)
  status=$?
  # the log line holds the whole message (the console wraps it)
  message=$(printf '%s\n' "$out" | grep -E "\]\[ERROR\] - |^Error|Could not" | tail -1 | sed 's/^.*\]\[ERROR\] - //')
  printf -- '- `%s` -> exit %s: %s\n' "${args//$tmp/\$TMP}" "$status" "${message//$tmp/\$TMP}"
done
