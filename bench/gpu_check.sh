#!/usr/bin/env bash
# One pass on a GPU machine: the CUDA tests, the quick preset on the cuda probe (the GPU
# baseline), a larger sweep, the bench suite, and step-time fidelity. Everything it writes
# goes under $OUT (default /tmp/multiopt-gpu): log.txt and one folder per sweep.
#   bash bench/gpu_check.sh            (from the repository root, torch with CUDA installed)
set -u
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
OUT="${OUT:-/tmp/multiopt-gpu}"
mkdir -p "$OUT"
log="$OUT/log.txt"
step() { echo; echo "=== $* ($(date +%T))"; }
{
  step "device"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name())"

  step "CUDA tests"
  timeout 150 python3 -m pytest -q -p no:cacheprovider -rs -k "cuda or gpu" \
    tests/test_probes.py tests/test_state.py tests/test_profile.py tests/test_measure.py 2>&1 | tail -25

  step "quick preset, cuda probe, isolated"
  timeout 150 python3 -m multiopt run --preset quick --probe cuda --out "$OUT/quick" --no-progress --no-report 2>&1 | tail -8

  step "default preset's main grid at two widths, cuda probe, one process"
  timeout 120 python3 -m multiopt run --preset default --probe cuda --out "$OUT/default" --no-progress --no-report \
    --widths 1024,4096 --batches 64,256 --no-isolate 2>&1 | tail -8

  step "step-time fidelity"
  timeout 60 python3 bench/step_time_fidelity.py --device cuda --rounds 5 --width 4096 --batch 256 2>&1 | tail -3
} > "$log" 2>&1
cat "$log"
