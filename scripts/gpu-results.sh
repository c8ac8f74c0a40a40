#!/usr/bin/env bash
# The GPU runs behind docs/RESULTS.md, in stages; each fits one 10-minute call on a lent GPU machine.
#   scripts/gpu-results.sh probes            training throughput and profiles of the teacher's and the students' configs
#   scripts/gpu-results.sh shapes-teacher    the teacher (flow matching)
#   scripts/gpu-results.sh shapes-students   the 4-step and the 1-step DMD2 students, trained side by side on one GPU
#   scripts/gpu-results.sh shapes-bench      benchmarks of both students (with the teacher's rows) and their comparison
#   scripts/gpu-results.sh wan               Wan2.1-1.3B architecture: DMD2 step throughput and MFU, latency
#   VARIANTS="dmd ema gan gan-ema" scripts/gpu-results.sh ablation-train   DMD2 variants (below), trained side by side
#   VARIANTS="dmd ema gan gan-ema" scripts/gpu-results.sh ablation-bench   their benchmarks (teacher rows in the first)
#     and their comparison. A variant is a name below; a "1-" prefix makes it a 1-step student.
# The shapes stages read shards from runs/gpu-data/shards (made beforehand, see docs/RESULTS.md).
# Extra arguments are `--set` overrides for the training runs. Results go to ${OUT:-results}/.
set -euo pipefail
out=${OUT:-results}
mkdir -p "$out"
stage=${1:?stage}
shift
sets=()
for s in "$@"; do sets+=(--set "$s"); done
distill() { python3 -m distill.cli "$@"; }
latest() { echo "$1/checkpoints/$(cat "$1/checkpoints/latest")"; }
resume() { [ -e "$1/checkpoints/latest" ] && echo --resume || true; }  # a stage cut off by its call goes on
bench_of() { echo "$1/bench/$(cat "$1/checkpoints/latest")"; }
quiet() { grep -v -e Warning -e warn; }

# DMD2 ablation (issue 11): overrides of configs/gpu/shapes-student-4.yaml (or -1.yaml), same data and budget.
declare -A VARIANT=(
  [dmd]=""
  [ema]="method_config.ema_decay=0.99 method_config.ema_start_step=20"
  [gan]="method_config.gan_critic_weight=0.01 method_config.gan_generator_weight=0.005"
  [gan-ema]="method_config.gan_critic_weight=0.01 method_config.gan_generator_weight=0.005 method_config.ema_decay=0.99 method_config.ema_start_step=20"
  [w2]="method_config.real_score_guidance_scale=2.0"
  [w3]="method_config.real_score_guidance_scale=3.0"
)
variant_run() {  # variant_run NAME: the training command's arguments
  local name=$1 steps=4 base=${1#1-}
  [ "$name" != "$base" ] && steps=1
  [ -n "${VARIANT[$base]+x}" ] || { echo "unknown variant $base" >&2; exit 2; }
  local args=(configs/gpu/shapes-student-$steps.yaml --set "run.output=runs/gpu/ablation/$name" --set "run.name=ablation-$name")
  for o in ${VARIANT[$base]}; do args+=(--set "$o"); done
  echo "${args[@]}"
}

case "$stage" in
  ablation-train)
    for name in ${VARIANTS:?VARIANTS}; do variant_run "$name" > /dev/null; done  # unknown names stop here
    for name in $VARIANTS; do
      # shellcheck disable=SC2046
      distill train $(variant_run "$name") $(resume "runs/gpu/ablation/$name") "${sets[@]}" > "$out/ablation-$name.log" 2>&1 &
    done
    wait
    for name in $VARIANTS; do echo "$name: $(tail -n 1 "$out/ablation-$name.log")"; done
    ;;
  ablation-bench)
    reports=() teacher=()
    for name in ${VARIANTS:?VARIANTS}; do
      distill bench "$(latest "runs/gpu/ablation/$name")" --prompts 24 --seeds 4 --teacher-steps 50 --real-videos 512 \
        --video-format gif "${teacher[@]}" 2>&1 | tail -1
      teacher=(--no-teacher)  # the same teacher, prompts and seeds: its rows are in the first report
      reports+=("$(bench_of "runs/gpu/ablation/$name")")
      cp "runs/gpu/ablation/$name/metrics.jsonl" "$out/ablation-$name-metrics.jsonl"
    done
    distill compare "${reports[@]}" --out "$out/ablation-compare"
    ;;
  probes)
    python3 -m distill.bench.training configs/gpu/shapes-teacher.yaml --iterations 20 --profile \
      --json "$out/probe-teacher.json" 2>&1 | quiet > "$out/probe-teacher.txt"
    python3 -m distill.bench.training configs/gpu/shapes-student-4.yaml --set roles.teacher.init_from=null \
      --iterations 20 --profile --json "$out/probe-student.json" 2>&1 | quiet > "$out/probe-student.txt"
    grep -h -e mean_seconds -e student_update_seconds -e critic_only_seconds -e '"mfu' "$out"/probe-*.txt
    ;;
  shapes-teacher)
    distill train configs/gpu/shapes-teacher.yaml $(resume runs/gpu/teacher) "${sets[@]}" 2>&1 | quiet | tail -3
    # a bf16 copy of the exported teacher (12 MB) comes back, to carry into a later machine's call
    python3 -c "import sys, torch; from diffusers import WanTransformer3DModel as W
W.from_pretrained(sys.argv[1]).to(torch.bfloat16).save_pretrained(sys.argv[2])" \
      "$(latest runs/gpu/teacher)/export/transformer" "$out/teacher"
    ;;
  shapes-students)
    distill train configs/gpu/shapes-student-4.yaml $(resume runs/gpu/student-4) "${sets[@]}" > "$out/student-4.log" 2>&1 &
    distill train configs/gpu/shapes-student-1.yaml $(resume runs/gpu/student-1) "${sets[@]}" > "$out/student-1.log" 2>&1
    wait
    tail -n 2 "$out"/student-*.log
    ;;
  shapes-bench)
    for k in 4 1; do
      distill bench "$(latest runs/gpu/student-$k)" --prompts 24 --seeds 4 --teacher-steps 50 --real-videos 512 \
        --training-iterations 20 --video-format gif 2>&1 | tail -1
    done
    distill compare "$(bench_of runs/gpu/student-4)" "$(bench_of runs/gpu/student-1)" --out "$out/compare"
    find runs/gpu -name '*.gif' -prune -o -type f \( -path '*/bench/*' -o -path '*/validation/*' -o -name metrics.jsonl \
      -o -name config.yaml \) -print | tar czf "$out/shapes-results.tgz" -T -
    ;;
  wan)
    python3 -m distill.bench.dmd2_step --iterations 12 --json "$out/wan_dmd2_step.json" 2>&1 | quiet | tail -30
    python3 -m distill.bench.wan_latency --json "$out/wan_latency.json" 2>&1 | quiet | tail -30
    ;;
  *) echo "unknown stage $stage" >&2; exit 2 ;;
esac
