#!/usr/bin/env bash
# Runs mgrq-run on bad inputs and prints, for each, its exit status, the one-line error and the status results.json
# was left with (issue: reliability). Signals are in tests/test_robustness.py.
#   bash scripts/bad_inputs.sh [MGRQ_RUN]      (default: mgrq-run on PATH; writes under a temporary directory)
#   ONLY='_link' bash scripts/bad_inputs.sh     (only the cases matching a regular expression)
# Every case runs with debug=smoke and 2 reconstruction iterations (SMALL), so that an input a version silently
# accepts costs seconds, not a whole run. A case "@name args" first calls prep_name (it builds what the case
# needs in $tmp/run or elsewhere), then run_name instead of mgrq-run when defined (a case of another command:
# mgrq-collect, a pipe), and afterwards, when defined, after_name (what the run left, appended).
# The full-disk case mounts a small tmpfs (needs root; "skipped" otherwise).
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
printf 'keep me\n' > "$tmp/precious.txt"
# 10-class grey trees for the proxy: pets_a, the same names with other pixels (pets_b), pets_a with its classes
# in another order (pets_reordered), and pets_a with an image whose header claims 1.6 G pixels (pets_bomb)
"$python" - "$tmp" <<'PY'
import struct, sys, zlib
from pathlib import Path
import torch
from PIL import Image
tmp = Path(sys.argv[1])
classes = [f"class{i}" for i in range(10)]
for name, seed, order in (("pets_a", 0, classes), ("pets_b", 1, classes), ("pets_reordered", 0, classes[::-1]),
                          ("pets_bomb", 0, classes)):
    g = torch.Generator().manual_seed(seed)
    for split, count in (("train", 4), ("val", 2)):
        for c in classes:
            (tmp / name / split / c).mkdir(parents=True)
            for i in range(count):
                pixels = torch.randint(0, 256, (28, 28), generator=g, dtype=torch.uint8).numpy()
                Image.fromarray(pixels).save(tmp / name / split / c / f"{i}.png")
    (tmp / name / "classes.txt").write_text("\n".join(order) + "\n")
def chunk(kind, data):
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
ihdr = struct.pack(">IIBBBBB", 40000, 40000, 8, 0, 0, 0, 0)
bomb = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0")) + chunk(b"IEND", b"")
(tmp / "pets_bomb/val/class3/0.png").write_bytes(bomb)
import timm
from safetensors.torch import save_file
save_file(timm.create_model("deit_tiny_patch16_224", num_classes=10).state_dict(), str(tmp / "deit_t_10_classes.safetensors"))
(tmp / "ckpt_dir").mkdir()
(tmp / "ckpt_dir" / "model.safetensors").write_bytes(b"")
PY
pets="data=folder data.workers=0 data.num_eval=null"
# an export of each kind the cases read: Fashion-MNIST (minmax, the settings every export case repeats) and pets_a
$mgrq_run progress=false hydra.run.dir="$tmp/export" debug=smoke method=minmax export=true >/dev/null 2>&1
$mgrq_run progress=false hydra.run.dir="$tmp/pets_export" debug=smoke method=minmax export=true $pets data.root="$tmp/pets_a" >/dev/null 2>&1
edit_json() {  # edit_json FILE PYTHON-STATEMENT (on the dict m), without updating any checksum
  "$python" -c "import json,sys; p=sys.argv[1]; m=json.load(open(p)); $2; json.dump(m, open(p, 'w'))" "$1"
}
tampered() {  # tampered NAME STATEMENT: a copy of the export with its manifest changed
  rm -rf "$tmp/$1"; cp -r "$tmp/export" "$tmp/$1"; edit_json "$tmp/$1/quantized_model.json" "$2"
}
tampered no_checksum "del m['weights_sha256']"
tampered a_bits_raised "m['quant_config']['a_bits'] = 8"
tampered words "m['num_calib'] = 'many'"
tampered onnx_outside "m['onnx'] = {'file': '../export/quantized_model.json', 'sha256': '0'}"
redigest() {  # redigest DIR: the manifest's digest recomputed (a careful forger), with the version's own function
  "$python" -c "import json,sys; from mgrq_runner.deploy.safetensors_export import manifest_digest as d
p=sys.argv[1]; m=json.load(open(p)); m['digest']=d(m); json.dump(m, open(p, 'w'))" "$1/quantized_model.json"
}
tampered relu_flipped "m['mlp_relu'] = True"; redigest "$tmp/relu_flipped"
printf 'train[0]\ncaf\xe9\n' > "$tmp/latin.txt"
mkdir -p "$tmp/results_latin"; printf '{"status": "d\xf6ne"}' > "$tmp/results_latin/results.json"
printf 'model,method\nproxy_vit,"mgrq\n' > "$tmp/broken_runs.csv"
cp -r "$tmp/pets_a" "$tmp/pets_bom"; printf '\xef\xbb\xbf' | cat - "$tmp/pets_a/classes.txt" > "$tmp/pets_bom/classes.txt"
export MGRQ_BAD_INPUTS_KEY=not-the-exporters-key
# an interrupted mgrq run on pets_a (SIGTERM once two units are saved), for the resume cases
interrupted_args="method=mgrq method.recon.iters=200 $pets data.root=$tmp/pets_a"
$mgrq_run progress=false hydra.run.dir="$tmp/interrupted" debug=smoke $interrupted_args > "$tmp/interrupted.log" 2>&1 &
job=$!
until grep -q "unit blocks.0" "$tmp/interrupted.log" || ! kill -0 $job 2>/dev/null; do sleep 0.2; done
kill -TERM $job; wait $job 2>/dev/null
# a sweep of two finished jobs, for the refused-rerun case
$mgrq_run --multirun progress=false hydra.sweep.dir="$tmp/sweep" debug=smoke method=minmax seed=0,1 >/dev/null 2>&1

prep_lock_link() { mkdir -p "$tmp/run"; ln -s "$tmp/precious.txt" "$tmp/run/.lock"; }
prep_calib_link() { mkdir -p "$tmp/run"; ln -s "$tmp/precious.txt" "$tmp/run/calibration_images.txt"; }
after_calib_link() {  # the target must hold exactly what it held (a log appended to it is written through too)
  [ "$(cat "$tmp/precious.txt")" = "keep me" ] && echo "link target intact" || echo "LINK TARGET WRITTEN TO"
  printf 'keep me\n' > "$tmp/precious.txt"
}
after_lock_link() { after_calib_link; }
prep_other_data() { cp -r "$tmp/interrupted" "$tmp/run"; }
prep_no_fingerprint() { cp -r "$tmp/interrupted" "$tmp/run"; edit_json "$tmp/run/recon_state/manifest.json" "del m['fingerprint']"; }
prep_done() { cp -r "$tmp/export" "$tmp/run"; }
prep_own_dir() { cp -r "$tmp/export" "$tmp/run"; }
after_own_dir() { "$python" -c "import json,sys; r=json.load(open(sys.argv[1])); print('record kept' if 'mode' not in r else 'RECORD REPLACED')" "$tmp/run/results.json"; }
prep_full_disk() { mkdir -p "$tmp/run"; mount -t tmpfs -o size=300k tmpfs "$tmp/run" 2>/dev/null || echo "no tmpfs" > "$tmp/no_tmpfs"; }
after_full_disk() {  # the empty files the full disk left, if any
  [ -f "$tmp/no_tmpfs" ] && echo "skipped (no tmpfs)"
  empty=$(find "$tmp/run" -size 0 -type f ! -name .lock | sed "s|$tmp|\$TMP|" | head -3 | tr '\n' ' ')
  echo "empty files: ${empty:-none}"; umount "$tmp/run" 2>/dev/null; rm -f "$tmp/no_tmpfs"
}
prep_hydra_link() { mkdir -p "$tmp/run/.hydra"; ln -s "$tmp/precious.txt" "$tmp/run/.hydra/config.yaml"; }
after_hydra_link() { after_calib_link; }
prep_log_link() { mkdir -p "$tmp/run"; ln -s "$tmp/precious.txt" "$tmp/run/cli.log"; }
after_log_link() { after_calib_link; }
prep_results_dir() { mkdir -p "$tmp/run/results.json"; }
prep_done_pets() { cp -r "$tmp/pets_export" "$tmp/run"; }
prep_collect_link() { rm -rf "$tmp/collected"; mkdir "$tmp/collected"; cp -r "$tmp/export" "$tmp/collected/";
  ln -s "$tmp/precious.txt" "$tmp/collected/summary.md"; }
run_collect_link() { "$python" -m mgrq_runner.analysis.collect "$tmp/collected"; }
after_collect_link() { after_calib_link; }
run_collect() { "$python" -m mgrq_runner.analysis.collect "${@:2}"; }  # $1 is the word mgrq-collect
run_help_pipe() {  # the reader gone before the help is written: the pipe's read end closed first
  "$python" -c "import os, subprocess, sys
r, w = os.pipe(); os.close(r)
done = subprocess.run([sys.argv[1], '--help'], stdout=w, stderr=subprocess.PIPE, text=True)
print(done.stderr.strip().splitlines()[-1] if done.stderr.strip() else 'no error output'); sys.exit(done.returncode)" \
  "$(command -v "$mgrq_run")"
}
prep_bad_uri() { started=$(date +%s.%N); }  # the tracker cases report how long the refusal took
prep_readonly_store() { prep_bad_uri; }
after_bad_uri() { "$python" -c "import sys, time; print(f'{time.time() - float(sys.argv[1]):.1f} s')" "$started"; }
after_readonly_store() { after_bad_uri; }
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
  'data.root=${oc.env:MGRQ_UNSET_VARIABLE}'
  "model.checkpoint=$tmp/ckpt_dir"
  "model=deit_t model.pretrained=false model.checkpoint=$tmp/deit_t_10_classes.safetensors"
  "mode=eval checkpoint=$tmp/no_checksum"
  "mode=eval checkpoint=$tmp/a_bits_raised"
  "mode=eval checkpoint=$tmp/words"
  "mode=eval checkpoint=$tmp/onnx_outside eval.runtime=onnxruntime"
  "@lock_link method=minmax"
  "@calib_link method=minmax"
  "@other_data resume=true debug=smoke $interrupted_args data.root=$tmp/pets_b"
  "@no_fingerprint resume=true debug=smoke $interrupted_args"
  "mode=eval checkpoint=$tmp/pets_export $pets data.root=$tmp/pets_reordered"
  "@done resume=true method=minmax export=true data.eval_split=heldout"
  "@own_dir mode=eval checkpoint=$tmp/run"
  "$pets data.root=$tmp/pets_bomb method=minmax"
  "@full_disk method=minmax export=true"
  "--multirun hydra.sweep.dir=$tmp/sweep method=minmax quant.input_bits=6 seed=0,1 resume=true"
  # issue 37: the doors the first rounds did not reach
  "@hydra_link method=minmax"
  "@log_link method=minmax"
  "@collect_link mgrq-collect \$TMP/collected (its summary.md a link)"
  "@collect mgrq-collect $tmp/results_latin"
  "@collect mgrq-collect $tmp/broken_runs.csv"
  "calib.list=$tmp/latin.txt calib.num_images=null"
  "calib.list=$tmp/empty_run calib.num_images=null"
  "@results_dir resume=true method=minmax"
  "mode=eval checkpoint=$tmp/relu_flipped"
  "@done_pets resume=true method=minmax export=true $pets data.root=$tmp/pets_b"
  "@bad_uri logger=mlflow logger.tracking_uri=http:// method=minmax"
  "@readonly_store logger=mlflow logger.tracking_uri=sqlite:////proc/mlflow.db method=minmax"
  "mode=eval checkpoint=$tmp/export sign_key_env=MGRQ_BAD_INPUTS_KEY"
  "@help_pipe mgrq-run --help | head -2"
  "$pets data.root=$tmp/pets_bom method=minmax"
  "model.num_classes=5 method=minmax"
  "model.checkpoint=/dev/zero method=minmax"
  "experiment=nope"
  "--multirun hydra.sweep.dir=$tmp/sweep2 method=minmax seed=0,"
)
for case in "${cases[@]}"; do
  [[ -n ${ONLY:-} && ! $case =~ $ONLY ]] && continue  # ONLY=<regex>: just the cases it matches
  rm -rf "$tmp/run"
  name="" args=$case
  if [[ $case == @* ]]; then name=${case%% *}; name=${name#@}; args=${case#* }; "prep_$name"; fi
  where=hydra.run.dir="$tmp/run"
  [[ $args == --multirun* ]] && where="--multirun" args=${args#--multirun }
  base=$small
  [[ " $args " == *" method=minmax "* ]] && base="debug=smoke"  # minmax has no method.recon
  if [ -n "$name" ] && declare -F "run_$name" >/dev/null; then
    # shellcheck disable=SC2086
    out=$("run_$name" $args 2>&1)
  else
    # shellcheck disable=SC2086
    out=$($mgrq_run $where progress=false $base $args 2>&1)
  fi
  status=$?
  # the log line holds the whole message; else the console's "error:" message, its wrapped lines joined
  message=$(printf '%s\n' "$out" | grep -E "\]\[ERROR\] - " | tail -1 | sed 's/^.*\]\[ERROR\] - //')
  [ -z "$message" ] && message=$(printf '%s\n' "$out" | awk '/^(error|Error): /{m=""; f=1} f{m=m (m ? " " : "") $0} END{print m}')
  [ -z "$message" ] && message=$(printf '%s\n' "$out" | grep -E "Could not|Traceback" | tail -1)
  [ -z "$message" ] && message=$(printf '%s\n' "$out" | tail -1)
  left=$(python3 -c "import json,sys; print(json.load(open(sys.argv[1])).get('status'))" "$tmp/run/results.json" 2>/dev/null || echo "no results.json")
  if [ -n "$name" ] && declare -F "after_$name" >/dev/null; then left="$left; $("after_$name")"; fi
  printf -- '| `%s` | %s | %s | %s |\n' "${case//$tmp/\$TMP}" "$status" "${message//$tmp/\$TMP}" "$left"
done
