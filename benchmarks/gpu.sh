#!/usr/bin/env bash
# The GPU measurements, one command per chunk, each under 10 minutes:
#
#   bash benchmarks/gpu.sh smoke      # FIRST, under 5 minutes: the default experiment twice
#                                     # (bit for bit), det_seg at 512x512, the NYUv2 protocol's
#                                     # step (ew, pcgrad, upgrad, mgda): compile s, step ms, peak
#                                     # memory (benchmarks/gpu_smoke.py)
#   bash benchmarks/gpu.sh memory     # XLA's memory analysis of det_seg 512 and the NYUv2
#                                     # step, T = 2, 3, 10, each level (benchmarks/memory_plan.py)
#   bash benchmarks/gpu.sh compare    # mtjax vs PyTorch (eager, torch.compile, LibMTL-style loop,
#                                     # torchjd), ResNet-50 setup of ../shared/REFERENCE.md
#   bash benchmarks/gpu.sh w1 .. w7   # benchmarks/step_time.py --setup resnet50, the weighting
#                                     # methods split in seven groups (each measures ew again)
#   bash benchmarks/gpu.sh t10        # 10 tasks, representation level, four methods
#   bash benchmarks/gpu.sh all        # everything in turn (a machine held long enough)
#
# Writes into $OUT (default benchmarks/results/gpu): compare_torch_resnet50.{json,md},
# step_time_r50_<chunk>.{json,md}, and <chunk>.log. Each chunk runs under `timeout` (570 s).
# GPU_TINY=1 runs every chunk at a tiny size (32×32, batch 2, 1 step) to test this script on a CPU
# (still ResNet-50: minutes of compilation per step on a CPU).
# GPU_DRY=1: a dry run on any machine in < 2 min (idle 2-core CPU): every chunk's command with
# the tiny model (resnet_tiny, 16×16, batch 2, 1 step), the first method of each group at the
# parameter level, into $OUT (default /tmp/gpu_dry, not the results folder). Run it first:
#   GPU_DRY=1 bash benchmarks/gpu.sh all && bash benchmarks/gpu.sh compare
#
# PyTorch: the comparison needs torch (and torchjd) in the device's Python. Without torch,
# `compare` measures the mtjax side alone (compare_torch.py --torch auto) and says so in its
# table. Carrying torch to a device machine does not work: the working-tree copy is limited to
# 64 MiB, the CPU wheel alone is 183 MiB and a CUDA build is several GB with its nvidia-* wheels
# (see benchmarks/README.md, "GPU"). The PyTorch side needs a device image that has torch.
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}."
DRY="${GPU_DRY:-0}"
if [[ "$DRY" == "1" ]]; then OUT="${OUT:-/tmp/gpu_dry}"; else OUT="${OUT:-benchmarks/results/gpu}"; fi
mkdir -p "$OUT"
LIMIT=570
SETUP=resnet50
LEVELS=()
SMOKE_ARGS=()
MEMORY_ARGS=()

if [[ "$DRY" == "1" ]]; then
  SETUP=tiny
  CMP_SIZE=(--image-size 16 --batch 2 --rounds 1 --steps 1 --warmup 0 --block-warmup 0
            --only ew,pcgrad_param --allow-busy)
  ST_SIZE=(--image-size 16 --batch 2 --steps 1 --warmup 0)
  LEVELS=(--levels parameter)
  SMOKE_ARGS=(--dry)
  MEMORY_ARGS=(--tiny --num-tasks 2 --levels loss)
elif [[ "${GPU_TINY:-0}" == "1" ]]; then
  CMP_SIZE=(--image-size 32 --batch 2 --rounds 1 --steps 1 --warmup 0 --block-warmup 0)
  ST_SIZE=(--image-size 32 --batch 2 --steps 1 --warmup 0)
else
  CMP_SIZE=(--rounds 3 --steps 20)
  ST_SIZE=()
fi

# The weighting methods in groups of at most ten compilations of the ResNet-50 step.
declare -A CHUNK_METHODS=(
  [w1]="pcgrad,mgda,upgrad,cagrad"
  [w2]="nash_mtl,imtl,aligned_mtl,gradvac"
  [w3]="moco,db_mtl,dualproj,con_fig"
  [w4]="graddrop,gradnorm,auto_lambda"
  [w5]="fixed,uw,dwa,rlw,gls,famo"
  [w6]="excess_mtl,fairgrad,sdmgrad,modo"
  [w7]="forum,moml,weight_net,go4align,igb,stch"
)

check_groups() {  # every registered method is in one group
  python3 - "${CHUNK_METHODS[@]}" <<'EOF'
import sys
from mtjax import weighting
grouped = {m for g in sys.argv[1:] for m in g.split(",")} | {"ew"}
missing = sorted(set(weighting.names()) - grouped)
if missing:
  print(f"gpu.sh: methods in no group (measure them with step_time.py --methods): {missing}")
EOF
}

info() {
  python3 -c "import jax; print('jax', jax.__version__, jax.devices())"
  python3 -c "import torch; print('torch', torch.__version__, torch.cuda.is_available())" \
    2>/dev/null || echo "torch: not installed (the comparison measures mtjax alone)"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null || true
}

run_chunk() {
  local chunk="$1"
  case "$chunk" in
    compare)
      timeout "$LIMIT" python3 benchmarks/compare_torch.py --setup "$SETUP" "${CMP_SIZE[@]}" \
        --out "$OUT" ;;
    w[1-7])
      local methods="${CHUNK_METHODS[$chunk]}"
      [[ "$DRY" == "1" ]] && methods="${methods%%,*}"
      timeout "$LIMIT" python3 benchmarks/step_time.py --setup "$SETUP" "${ST_SIZE[@]}" \
        ${LEVELS[@]+"${LEVELS[@]}"} --methods "$methods" --out "$OUT/step_time_r50_$chunk" ;;
    smoke)
      timeout "$LIMIT" python3 benchmarks/gpu_smoke.py ${SMOKE_ARGS[@]+"${SMOKE_ARGS[@]}"} \
        --workdir "$OUT/smoke_runs" --out "$OUT/smoke" ;;
    memory)
      timeout "$LIMIT" python3 benchmarks/memory_plan.py ${MEMORY_ARGS[@]+"${MEMORY_ARGS[@]}"} \
        --out "$OUT/memory_plan" ;;
    t10)
      local methods=mgda,pcgrad,upgrad
      [[ "$DRY" == "1" ]] && methods=mgda
      timeout "$LIMIT" python3 benchmarks/step_time.py --setup "$SETUP" "${ST_SIZE[@]}" \
        --num-tasks 10 --levels representation --methods "$methods" \
        --out "$OUT/step_time_r50_t10" ;;
    *)
      echo "gpu.sh: unknown chunk '$chunk' (smoke, memory, compare, w1..w7, t10, all)" >&2
      return 2 ;;
  esac
}

chunk="${1:-compare}"
info
if [[ "$chunk" == "all" ]]; then
  check_groups
  failed=()
  for c in smoke memory compare w1 w2 w3 w4 w5 w6 w7 t10; do  # a chunk that fails (or times out) does not stop the rest
    run_chunk "$c" 2>&1 | tee "$OUT/$c.log" || failed+=("$c")
  done
  if (( ${#failed[@]} )); then
    echo "gpu.sh: failed chunks: ${failed[*]} (see $OUT/<chunk>.log)" >&2
    exit 1
  fi
  echo "gpu.sh: all chunks done, results in $OUT"
else
  run_chunk "$chunk" 2>&1 | tee "$OUT/$chunk.log"
fi
