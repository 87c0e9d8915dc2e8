#!/usr/bin/env bash
# Every GPU check of loraplex in one short run (about 6-8 minutes on one H200-class GPU), for a machine with CUDA:
# the CUDA tests, then the benchmarks whose targets were set for a GPU, each with --device cuda and a time limit.
# Results go to $OUT (default ./gpu-results): one log per step plus summary.txt with the lines that carry the ratios.
#
#   bash benchmarks/gpu_check.sh            # torch with CUDA, transformers, peft, pytest and pydantic importable
#
# The package need not be installed: src/ goes on PYTHONPATH. On the workplace's bare GPU image (torch, transformers,
# peft, safetensors, pytest, PyYAML, matplotlib present; pydantic missing; no network) carry pydantic as wheels in
# .whl/ (git-ignored), fetched beforehand on a machine with PyPI:
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_17_x86_64 -d .whl pydantic==2.13.4 pydantic_core==2.46.4 annotated-types==0.7.0 \
#     typing-inspection==0.4.2
# and run it with carry [".whl"]: the script installs .whl/*.whl into /tmp/site first when the folder is there.
# The MiniLM package (an 83 MB wheel) does not fit the 64 MiB carry: its CUDA test skips and benchmarks/moe.py
# leaves out its MiniLM-routed variant.
# A dry run without a GPU: GPU_CHECK_DEVICE=cpu GPU_CHECK_QUICK=1 bash benchmarks/gpu_check.sh (same steps, tiny sizes).
set -u
DEV="${GPU_CHECK_DEVICE:-cuda}"
QUICK=""
[ -n "${GPU_CHECK_QUICK:-}" ] && QUICK="--quick"
export LORAPLEX_TEST_DEVICE="$DEV"
OUT="${OUT:-gpu-results}"
mkdir -p "$OUT"
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
WHEELS="${WHEELS:-.whl}"  # carried wheels for what the image lacks
if ls "$WHEELS"/*.whl > /dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
    "$WHEELS"/*.whl || echo "installing the wheels in $WHEELS failed (built for another Python?)"
  export PYTHONPATH="/tmp/site:${PYTHONPATH:-}"
fi
export PYTHONPATH="$PWD/src:${PYTHONPATH:-}"
step() {  # step NAME SECONDS COMMAND...
  local name=$1 limit=$2
  shift 2
  local t0=$SECONDS
  timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
  echo "== $name: exit $? in $((SECONDS - t0)) s" >> "$OUT/summary.txt"
}
python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda,
           torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'no GPU')" > "$OUT/summary.txt" 2>&1
step cuda_tests 180 python3 -m pytest -q tests/test_cuda.py tests/test_quant.py -k cuda
step mixed_batch 90 python3 benchmarks/mixed_batch.py --device $DEV --repeats 20 $QUICK
step kernel_choice 45 python3 benchmarks/kernel_choice.py --device $DEV --repeats 20 $QUICK
step moe 90 python3 benchmarks/moe.py --device $DEV --repeats 5 $QUICK
step train 120 python3 benchmarks/train.py --device $DEV --repeats 2 ${QUICK:---full}
{
  echo; echo "--- cuda tests"; tail -n 3 "$OUT/cuda_tests.log"
  echo; echo "--- mixed_batch (targets: LoRA overhead <= 1/4 of PEFT mixed, single <= 1.03x base)"
  grep -E "^\| |^prefill:|^decode:" "$OUT/mixed_batch.log"
  echo; echo "--- kernel_choice"; grep -E "worst auto" "$OUT/kernel_choice.log"
  echo; echo "--- moe (target: routed >= 0.9x single)"; grep -E "^\| |vs single adapter|skipped" "$OUT/moe.log"
  echo; echo "--- train (target: joint >= 1.5x sequential)"; grep -E "^\| |joint / sequential" "$OUT/train.log"
} >> "$OUT/summary.txt"
cat "$OUT/summary.txt"
