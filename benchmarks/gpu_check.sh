#!/usr/bin/env bash
# Every GPU check of loraplex in one short run (about 6-8 minutes on one H200-class GPU), for a machine with CUDA:
# the CUDA tests, then the benchmarks whose targets were set for a GPU, each with --device cuda and a time limit.
# Results go to $OUT (default ./gpu-results): one log per step plus summary.txt with the lines that carry the ratios.
#
#   bash benchmarks/gpu_check.sh            # needs torch with CUDA and the package installed (pip install -e ".[test]")
set -u
OUT="${OUT:-gpu-results}"
mkdir -p "$OUT"
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
step() {  # step NAME SECONDS COMMAND...
  local name=$1 limit=$2
  shift 2
  local t0=$SECONDS
  timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
  echo "== $name: exit $? in $((SECONDS - t0)) s" | tee -a "$OUT/summary.txt"
}
python -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name(0))" \
  | tee "$OUT/summary.txt"
step cuda_tests 150 python -m pytest -q -p no:cacheprovider tests/test_cuda.py
step mixed_batch 120 python benchmarks/mixed_batch.py --device cuda --repeats 20
step kernels 60 python benchmarks/kernels.py --device cuda --repeats 20
step moe 120 python benchmarks/moe.py --device cuda --repeats 5
step train 120 python benchmarks/train.py --device cuda --full --repeats 2
{
  echo; echo "--- cuda tests"; tail -n 3 "$OUT/cuda_tests.log"
  echo; echo "--- mixed_batch (targets: mixed <= 1.10x base, single <= 1.06x, >= 1.2x faster than PEFT mixed)"
  grep -E "^\| |^prefill:|^decode:" "$OUT/mixed_batch.log"
  echo; echo "--- kernels"; grep -E "worst auto" "$OUT/kernels.log"
  echo; echo "--- moe (target: routed >= 0.9x single)"; grep -E "^\| |routed top-1" "$OUT/moe.log"
  echo; echo "--- train (target: joint >= 1.5x sequential)"; grep -E "^\| |joint / sequential" "$OUT/train.log"
} >> "$OUT/summary.txt"
cat "$OUT/summary.txt"
