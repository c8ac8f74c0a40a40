#!/usr/bin/env bash
# The GPU runs behind docs/RESULTS.md, in stages (each fits one call on a lent GPU machine).
#   scripts/gpu-results.sh shapes-train     teacher (flow matching) and the 4-step student
#   scripts/gpu-results.sh shapes-finish    the 1-step student, benchmarks of both, comparison
#   scripts/gpu-results.sh wan              Wan2.1-1.3B architecture: DMD2 step throughput and MFU, latency
# Shards of the shapes world are made beforehand (runs/gpu-data/shards, see docs/RESULTS.md).
# Results go to ${OUT:-results}/.
set -euo pipefail
out=${OUT:-results}
mkdir -p "$out"
distill() { python3 -m distill.cli "$@"; }
latest() { echo "$1/checkpoints/$(cat "$1/checkpoints/latest")"; }

case "${1:?stage}" in
  shapes-train)
    distill train configs/gpu/shapes-teacher.yaml 2>&1 | grep -v Warning | tail -3
    distill train configs/gpu/shapes-student-4.yaml 2>&1 | grep -v Warning | tail -3
    ;;
  shapes-finish)
    distill train configs/gpu/shapes-student-1.yaml 2>&1 | grep -v Warning | tail -3
    for k in 4 1; do
      distill bench "$(latest runs/gpu/student-$k)" --prompts 24 --seeds 4 --teacher-steps 50 --real-videos 256 \
        --training-iterations 20 --video-format gif 2>&1 | tail -1
    done
    distill compare runs/gpu/student-4/bench/step-002000 runs/gpu/student-1/bench/step-002000 --out "$out/compare" \
      > /dev/null
    tar czf "$out/shapes-results.tgz" runs/gpu/*/bench runs/gpu/*/metrics.jsonl "$out/compare" \
      runs/gpu/teacher/validation
    ;;
  wan)
    python3 -m distill.bench.dmd2_step --iterations 12 --json "$out/wan_dmd2_step.json" 2>&1 | grep -v Warning | tail -30
    python3 -m distill.bench.wan_latency --json "$out/wan_latency.json" 2>&1 | grep -v Warning | tail -30
    ;;
  *) echo "unknown stage $1" >&2; exit 2 ;;
esac
