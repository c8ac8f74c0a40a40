#!/usr/bin/env bash
# The GPU runs behind docs/RESULTS.md, in stages; each fits one 10-minute call on a lent GPU machine.
#   scripts/gpu-results.sh probes            training throughput and profiles of the teacher's and the students' configs
#   scripts/gpu-results.sh shapes-teacher    the teacher (flow matching)
#   scripts/gpu-results.sh shapes-students   the 4-step and the 1-step DMD2 students, trained side by side on one GPU
#   scripts/gpu-results.sh shapes-bench      benchmarks of both students (with the teacher's rows) and their comparison
#   DEMO_RECIPES="base ..." scripts/gpu-results.sh demo-seeds   the demo's student over seeds (below), then
#     scripts/gpu-results.sh demo-seeds-bench   its checkpoints on 96 videos, the table in $OUT/demo-seeds.csv
#   scripts/gpu-results.sh demo-teacher      candidates for the demo's committed teacher (issue 16), side by side
#   DEMO_TEACHER=runs/gpu/demo-teacher/small-1e-3 scripts/gpu-results.sh demo-student   the demo's student from one
#   scripts/gpu-results.sh wan               Wan2.1-1.3B architecture: DMD2 step throughput and MFU, latency
#   SCALING="dp:1 dp:8 sp720:8 ..." scripts/gpu-results.sh scaling   issue 17: several GPUs of one host (below)
#   LEVERS="base ckpt2 ..." scripts/gpu-results.sh levers   issue 14's levers, one at a time, on the same DMD2 step
#     (names below), then wan_latency with and without compile; results in $OUT/levers.tgz, then $OUT/LEVERS_DONE.
#     compile-grads(-nockpt, -aot, -flash, -undonated, -math, -small): scripts/compile_grads.py, compiled gradients
#     against eager.
#     lora, lora-14b, lora-a14b: student and critic as rank-64 LoRA adapters over the teacher's base (issue 15).
#   VARIANTS="dmd ema gan gan-ema" scripts/gpu-results.sh ablation-train   DMD2 variants (below), trained side by side
#   VARIANTS="dmd ema gan gan-ema" scripts/gpu-results.sh ablation-bench   their benchmarks (teacher rows in the first
#     4-step and the first 1-step one), side by side, and one comparison per step count.
#   VARIANTS="..." scripts/gpu-results.sh ablation   both of the above, then the results into $OUT/ablation.tgz.NN;
#     run detached (setsid) so that it goes on between calls while the machine stays warm.
#     A variant is a name below; a "1-" prefix makes it a 1-step student.
# TEACHER_STOP=3000 stops the teacher's stage once that step's checkpoint is complete (the students start there).
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
# a stage cut off by its call goes on from its checkpoint, or starts over when it had none yet
resume() { [ -e "$1/checkpoints/latest" ] && echo --resume || echo --overwrite; }
bench_of() { echo "$1/bench/$(cat "$1/checkpoints/latest")"; }
quiet() { grep -v -e Warning -e warn; }

# DMD2 ablation (issue 11): overrides of configs/gpu/shapes-student-4.yaml (or -1.yaml), same data and budget.
# Every variant starts from DMD alone at guidance 4 (BASE; the configs hold the winning recipe), then adds
# its parts, joined with "+" (gan10+ema+w3); "gan-ema" is gan+ema; a "1-" prefix makes a 1-step student.
BASE="method_config.real_score_guidance_scale=4.0 method_config.gan_critic_weight=0.0 \
method_config.gan_generator_weight=0.0 method_config.ema_decay=0.0"
declare -A PART=(
  [dmd]=""
  [ema]="method_config.ema_decay=0.99 method_config.ema_start_step=20"
  [gan]="method_config.gan_critic_weight=0.01 method_config.gan_generator_weight=0.005"    # DMD2's SDXL weights
  [gan10]="method_config.gan_critic_weight=0.1 method_config.gan_generator_weight=0.05"   # ten times those
  [gan100]="method_config.gan_critic_weight=1.0 method_config.gan_generator_weight=0.5"
  [w2]="method_config.real_score_guidance_scale=2.0"
  [w3]="method_config.real_score_guidance_scale=3.0"
  [long]="training.max_steps=4800 training.checkpoint_every=1600 validation.every=4800"    # three times the budget
  # issue 15: student and critic as rank-32 LoRA adapters over the teacher's weights, at 5 x the learning rates
  [lora]="roles.student.lora.rank=32 roles.student.share_base=true roles.critic.lora.rank=32 \
roles.critic.share_base=true training.learning_rate=5.0e-4 training.fake_score_learning_rate=2.0e-3"
)
variant_run() {  # variant_run NAME: the training command's arguments
  local name=$1 steps=4 base=${1#1-} part
  [ "$name" != "$base" ] && steps=1
  local args=(configs/gpu/shapes-student-$steps.yaml --set "run.output=runs/gpu/ablation/$name" --set "run.name=ablation-$name")
  [ -n "${TEACHER:-}" ] && args+=(--set "roles.teacher.init_from=$TEACHER")
  for o in $BASE; do args+=(--set "$o"); done
  for part in ${base//+/ }; do
    if [ "$part" = gan-ema ]; then for o in ${PART[gan]}; do args+=(--set "$o"); done; part=ema; fi
    [ -n "${PART[$part]+x}" ] || { echo "unknown variant part $part (in $name)" >&2; exit 2; }
    for o in ${PART[$part]}; do args+=(--set "$o"); done
  done
  echo "${args[@]}"
}

case "$stage" in
  ablation-train)
    export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}  # several runs share the machine's cores
    for name in ${VARIANTS:?VARIANTS}; do variant_run "$name" > /dev/null; done  # unknown names stop here
    for name in $VARIANTS; do
      # shellcheck disable=SC2046
      distill train $(variant_run "$name") $(resume "runs/gpu/ablation/$name") "${sets[@]}" > "$out/ablation-$name.log" 2>&1 &
    done
    wait
    for name in $VARIANTS; do echo "$name: $(tail -n 1 "$out/ablation-$name.log")"; done
    ;;
  ablation-bench)
    export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}
    declare -A reports=() teacher_done=()
    for name in ${VARIANTS:?VARIANTS}; do
      steps=4; [ "$name" != "${name#1-}" ] && steps=1
      teacher=(--no-teacher)  # the same teacher, prompts and seeds: its rows are in the first report per step count
      [ -z "${teacher_done[$steps]+x}" ] && teacher=() && teacher_done[$steps]=1
      distill bench "$(latest "runs/gpu/ablation/$name")" --prompts 24 --seeds 4 --teacher-steps 50 --real-videos 512 \
        --video-format gif "${teacher[@]}" > "$out/bench-$name.log" 2>&1 &
      reports[$steps]+=" $(bench_of "runs/gpu/ablation/$name")"
    done
    wait
    for name in $VARIANTS; do echo "$name: $(tail -n 1 "$out/bench-$name.log")"; done
    for steps in "${!reports[@]}"; do
      # shellcheck disable=SC2086
      distill compare ${reports[$steps]} --out "runs/gpu/ablation/compare-$steps" > /dev/null
    done
    ;;
  ablation)
    "$0" ablation-train "${@}"
    "$0" ablation-bench
    # reports, curves, configs and logs (contact sheets, not the videos) come back in one file
    cp "$out"/*.log runs/gpu/ablation/ 2>/dev/null || true
    find runs/gpu/ablation -name '*.gif' -prune -o -type f \( -path '*/bench/*' -o -path '*compare-*' \
      -o -name metrics.jsonl -o -name config.yaml -o -name '*.log' \) -print | tar czf "$out/ablation.tgz" -T -
    # in pieces under the 16 MiB a file may have to come back (cat ablation.tgz.* | tar xz)
    split -b 15M -d "$out/ablation.tgz" "$out/ablation.tgz." && rm "$out/ablation.tgz"
    touch "$out/DONE"
    ;;
  demo-teacher)  # issue 16: candidates for the demo's committed teacher, side by side; each benched at 50 steps, CFG 4
    # (shards: runs/demo-pretrain/shards, made on the CPU as configs/demo/teacher-pretrain.yaml says).
    # DEMO_TEACHERS="small:2e-3 medium:1e-3" (preset:learning rate); extra arguments: overrides of all of them.
    for candidate in ${DEMO_TEACHERS:-small:1e-3}; do
      preset=${candidate%%:*}; lr=${candidate#*:}; run=runs/gpu/demo-teacher/$preset-$lr
      distill train configs/demo/teacher-pretrain.yaml $(resume "$run") --set "run.output=$run" \
        --set "model.preset=$preset" --set "training.learning_rate=$lr" --set training.batch_size=256 \
        --set training.max_steps=${DEMO_TEACHER_STEPS:-3000} --set validation.video_format=gif "${sets[@]}" \
        > "$out/demo-teacher-$preset-$lr.log" 2>&1 &
    done
    wait
    for candidate in ${DEMO_TEACHERS:-small:1e-3}; do
      run=runs/gpu/demo-teacher/${candidate%%:*}-${candidate#*:}
      distill bench "$(latest "$run")" --prompts 24 --seeds 2 --real-videos 256 --video-format gif 2>&1 | quiet | tail -3
      mkdir -p "$out/demo-teacher/${run##*/}" && cp -r "$(bench_of "$run")" "$run/metrics.jsonl" "$out/demo-teacher/${run##*/}/"
      cp -r "$(latest "$run")/export/transformer" "$out/demo-teacher/${run##*/}/"
    done
    ;;
  demo-student)  # issue 16: the demo's student recipe (configs/demo/student.yaml) from a candidate teacher, on the GPU,
    # as a forecast of the CPU demo (same config and batch); DEMO_TEACHER=runs/gpu/demo-teacher/small-1e-3
    run=runs/gpu/demo-student/${DEMO_TEACHER:?DEMO_TEACHER}; run=${run%/}; run=runs/gpu/demo-student/${run##*/}
    distill train configs/demo/student.yaml $(resume "$run") --set "run.output=$run" \
      --set "roles.teacher.init_from=$(latest "$DEMO_TEACHER")" --set data.videos=runs/demo-pretrain/shapes \
      --set data.shards=runs/demo-pretrain/shards --set training.max_steps=${DEMO_STUDENT_STEPS:-600} \
      --set training.checkpoint_every=200 --set validation.video_format=gif "${sets[@]}" \
      > "$out/demo-student-${run##*/}.log" 2>&1
    for ckpt in "$run"/checkpoints/step-*; do  # each bench's whole log kept: on 12-04 all three stopped with an
      # IndexError whose traceback the old `| tail -1` cut off (not reproduced on the CPU)
      log="$out/demo-student-bench-${run##*/}-${ckpt##*/}.log"
      distill bench "$ckpt" --prompts 24 --seeds 2 --teacher-steps 50 --teacher-guidance 4 --real-videos 256 \
        --video-format gif > "$log" 2>&1 || { echo "bench of $ckpt failed:"; grep -v -i warn "$log" | tail -n 25; }
      tail -n 1 "$log"
    done
    mkdir -p "$out/demo-student/${run##*/}" && cp -r "$run/bench" "$run/metrics.jsonl" "$out/demo-student/${run##*/}/"
    ;;
  demo-seeds)  # issue 16: the spread of the demo's student over seeds, from the demo's data and committed teacher
    # (carry runs/demo/shapes and runs/demo/shards). DEMO_RECIPES="base shift1:method_config.timestep_shift=1.0"
    # (NAME[:KEY=VALUE,...], overrides of configs/demo/student.yaml), DEMO_SEEDS="0 1 2 3", DEMO_STUDENT_STEPS=600.
    # DEMO_RANKS=0: side by side on the GPU; 1: on the host's CPUs, one process of two threads; 2: on its CPUs,
    # two ranks of one thread and batch 2 (data parallel, the same batch of 4); on the CPU, DeepSpeed loads its
    # shared-memory op, which needs a DeepSpeed built against that machine's torch (a wheel built elsewhere stops
    # with "PyTorch version mismatch"). Start it detached (setsid) to go on between calls; demo-seeds-bench
    # benches what it left. Two at once need their own DEMO_PORT (each run takes the next port).
    mkdir -p runs/gpu/demo-seeds; port=$((${DEMO_PORT:-29600} + 50 * ${DEMO_RANKS:-0}))
    for recipe in ${DEMO_RECIPES:-base}; do
      name=${recipe%%:*}; extra=()
      [[ $recipe == *:* ]] && for kv in $(tr , " " <<< "${recipe#*:}"); do extra+=(--set "$kv"); done
      for seed in ${DEMO_SEEDS:-0 1 2 3}; do
        run=runs/gpu/demo-seeds/$name-r${DEMO_RANKS:-0}-s$seed; port=$((port + 1))
        args=(train configs/demo/student.yaml --overwrite --set "run.output=$run" --set "run.seed=$seed"
          --set "training.max_steps=${DEMO_STUDENT_STEPS:-600}" --set training.checkpoint_every=100
          --set training.keep_checkpoints=20 --set validation.every=0 "${extra[@]}" "${sets[@]}")
        case ${DEMO_RANKS:-0} in
          0) MASTER_PORT=$port python3 -m distill.cli "${args[@]}" > "$run.log" 2>&1 & ;;
          1) CUDA_VISIBLE_DEVICES= DS_ACCELERATOR=cpu OMP_NUM_THREADS=2 MASTER_PORT=$port \
               python3 -m distill.cli "${args[@]}" > "$run.log" 2>&1 & ;;
          2) CUDA_VISIBLE_DEVICES= DS_ACCELERATOR=cpu OMP_NUM_THREADS=1 deepspeed --num_gpus 2 --master_port $port \
               --module distill.cli "${args[@]}" --set training.batch_size=2 > "$run.log" 2>&1 & ;;
        esac
      done
    done
    wait
    ;;
  demo-seeds-bench)  # each demo-seeds checkpoint from step DEMO_BENCH_FROM (300) not benched yet, on 96 videos,
    # student rows only, DEMO_BENCH_JOBS (8) at a time; one report with the teacher's rows; the table into $OUT
    find runs/gpu/demo-seeds -path '*/checkpoints/step-*' -maxdepth 3 -type d | sort | while read -r ckpt; do
      step=${ckpt##*-}; [ "$((10#$step))" -ge "${DEMO_BENCH_FROM:-300}" ] && [ -e "$ckpt/MANIFEST.json" ] \
        && [ ! -e "${ckpt%/checkpoints/*}/bench/${ckpt##*/}/report.csv" ] && echo "$ckpt"
    done | xargs -r -P "${DEMO_BENCH_JOBS:-8}" -I{} sh -c 'python3 -m distill.cli bench {} --prompts 24 --seeds 4 \
      --no-teacher --real-videos 64 --video-format gif > {}.bench.log 2>&1 || tail -n 3 {}.bench.log'
    # the teacher's rows (the first run's guidance; its training step does not matter): any complete checkpoint
    first=$(find runs/gpu/demo-seeds -path '*/checkpoints/step-*/MANIFEST.json' -maxdepth 4 | sort | head -1)
    first=${first%/MANIFEST.json}
    [ -z "$first" ] || [ -e runs/gpu/demo-seeds/teacher-rows/report.csv ] || python3 -m distill.cli bench "$first" \
      --out runs/gpu/demo-seeds/teacher-rows --prompts 24 --seeds 4 --real-videos 64 --video-format gif > /dev/null 2>&1
    python3 - "$out/demo-seeds.csv" <<'PY'
import glob, sys
import pandas as pd
rows = []
for f in sorted(glob.glob("runs/gpu/demo-seeds/**/report.csv", recursive=True)):
    r = pd.read_csv(f)
    r["run"] = f.split("/")[3]
    rows.append(r[r.model.isin(["student", "teacher"])])
t = pd.concat(rows)[["run", "step", "model", "steps", "videos", "adherence_all", "adherence_shape",
                     "adherence_direction", "sharpness", "fd_oracle"]]
t.to_csv(sys.argv[1], index=False)
print(t.pivot_table(index="run", columns="step", values="adherence_all").round(3).to_string())
PY
    ;;
  probes)
    python3 -m distill.bench.training configs/gpu/shapes-teacher.yaml --iterations 20 --profile \
      --json "$out/probe-teacher.json" 2>&1 | quiet > "$out/probe-teacher.txt"
    python3 -m distill.bench.training configs/gpu/shapes-student-4.yaml --set roles.teacher.init_from=null \
      --iterations 20 --profile --json "$out/probe-student.json" 2>&1 | quiet > "$out/probe-student.txt"
    grep -h -e mean_seconds -e student_update_seconds -e critic_only_seconds -e '"mfu' "$out"/probe-*.txt
    ;;
  shapes-teacher)
    # shellcheck disable=SC2046
    python3 -m distill.cli train configs/gpu/shapes-teacher.yaml $(resume runs/gpu/teacher) "${sets[@]}" \
      > "$out/teacher.log" 2>&1 &
    pid=$!
    if [ -n "${TEACHER_STOP:-}" ]; then
      stop=$(printf 'step-%06d' "$TEACHER_STOP")
      until [ "$(cat runs/gpu/teacher/checkpoints/latest 2>/dev/null)" = "$stop" ] || ! kill -0 $pid 2>/dev/null; do
        sleep 2
      done
      kill $pid 2>/dev/null || true
    fi
    wait $pid || true
    grep -e trained -e Error "$out/teacher.log" | tail -3 || true  # (pipefail: no match is no failure)
    # a bf16 copy of the exported teacher (12 MB) comes back, to carry into a later machine's call;
    # TEACHER=runs/gpu/teacher-bf16 starts the ablation's students from the same copy
    python3 -c "import sys, torch; from diffusers import WanTransformer3DModel as W
m = W.from_pretrained(sys.argv[1]).to(torch.bfloat16); [m.save_pretrained(d) for d in sys.argv[2:]]" \
      "$(latest runs/gpu/teacher)/export/transformer" "$out/teacher" runs/gpu/teacher-bf16
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
  levers)
    # one lever per run over the default DMD2 step of `wan` (docs/PERFORMANCE.md, "Levers")
    declare -A LEVER=(
      [base]="--iterations 12"
      [ckpt2]="--iterations 12 --set model.checkpoint_every=2"
      [ckpt3]="--iterations 12 --set model.checkpoint_every=3"
      [save-attention]="--iterations 12 --set model.checkpoint_save=[attention]"
      [save-all]="--iterations 12 --set model.checkpoint_save=[attention,matmul]"
      [nockpt]="--iterations 12 --no-checkpointing"
      [cudnn]="--iterations 12 --set model.attention_backend=_native_cudnn"
      [flash]="--iterations 12 --set model.attention_backend=_native_flash"
      [unbatched]="--iterations 12 --set model.batched_cfg=false"
      [fused]="--iterations 12 --set training.optimizer_implementation=fused"
      [compile]="--iterations 16 --warmup 6 --set model.compile=true"
      # torch.profiler of one student update and one critic-only iteration: top operators in the JSON, the
      # (large) traces beside levers/, not in levers.tgz
      [profile]="--iterations 7 --profile $out/traces/base"
      [profile-compile]="--iterations 12 --warmup 6 --set model.compile=true --profile $out/traces/compile"
      # issue 15: LoRA student and critic (rank 64) over the teacher's base, held once
      [lora]="--iterations 12 --lora 64"
      [lora-14b]="--preset wan2.1-14b --iterations 7 --lora 64"
      [lora-a14b]="--preset wan2.2-a14b --iterations 7 --lora 64"
      [compile-save]="--iterations 16 --warmup 6 --set model.compile=true --set model.checkpoint_save=[attention]"
      # inductor's mix-order reductions (a norm backward's row and column reductions in one kernel) off
      [compile-nomix]="--iterations 16 --warmup 6 --set model.compile=true \
--set model.compile_options={\"triton.mix_order_reduction\":false}"
      [compile-save-nomix]="--iterations 16 --warmup 6 --set model.compile=true --set model.checkpoint_save=[attention] \
--set model.compile_options={\"triton.mix_order_reduction\":false}"
      [profile-compile-save-nomix]="--iterations 12 --warmup 6 --set model.compile=true \
--set model.checkpoint_save=[attention] --set model.compile_options={\"triton.mix_order_reduction\":false} \
--profile $out/traces/compile-save-nomix"
      [compile-ckpt2]="--iterations 16 --warmup 6 --set model.compile=true --set model.checkpoint_every=2 \
--set training.optimizer_implementation=fused"
    )
    declare -A GRADS=(  # scripts/compile_grads.py runs: which part makes compiled gradients differ from eager's
      [compile-grads]=""
      [compile-grads-nockpt]="--set model.gradient_checkpointing=false"
      [compile-grads-aot]="--compiled-set model.compile_backend=aot_eager"
      [compile-grads-undonated]="--no-donated-buffers"
      # attention as plain matmuls and softmax (inductor's own kernels), at 17 x 240 x 416 where that fits
      [compile-grads-math]="--video 17 240 416 --set model.attention_backend=_native_math"
      [compile-grads-small]="--video 17 240 416"
      [compile-grads-flash]="--set model.attention_backend=_native_flash"
      # where between 1,950 and 32,760 tokens the fault starts (480 x 832: 21, 41, 61 frames = 9,360, 17,160,
      # 24,960 tokens), and inductor's reductions split over the sequence turned off
      [compile-grads-21f]="--video 21 480 832"
      [compile-grads-41f]="--video 41 480 832"
      [compile-grads-61f]="--video 61 480 832"
      [compile-grads-nosplit]="--compiled-set model.compile_options={\"split_reductions\":false}"
      [compile-grads-save]="--set model.checkpoint_save=[attention]"   # the recommended training set-up
      [compile-grads-nomix]="--compiled-set model.compile_options={\"triton.mix_order_reduction\":false}"
      [compile-grads-nopersistent]="--compiled-set model.compile_options={\"triton.persistent_reductions\":false}"
    )
    declare -A LATENCY=(  # wan_latency runs
      [latency]=""
      [latency-compile]="--set model.compile=true"
      # the fast path for student and teacher alike: compiled blocks, channels-last conv weights, compiled decoder
      [latency-fast]="--against-stock --set model.compile=true --set model.vae_channels_last=true \
--set model.vae_compile=true"
      # CUDA graphs (inductor's reduce-overhead) for the per-frame decoder calls alone: for the blocks they are
      # refused (12-04: each replay overwrote the last block's output)
      [latency-graphs]="--against-stock --set model.compile_mode=reduce-overhead \
--set model.vae_channels_last=true --set model.vae_compile=true"
    )
    mkdir -p "$out/levers"
    for name in ${LEVERS:-base ckpt2 nockpt unbatched fused compile}; do
      if [ -n "${GRADS[$name]+x}" ]; then  # compiled gradients against eager, before any compiled lever is timed
        # shellcheck disable=SC2086
        python3 scripts/compile_grads.py ${GRADS[$name]} 2>&1 | quiet > "$out/levers/$name.log" \
          || echo "$name: the compiled gradients are not sound; see levers/$name.log"
        tail -n 5 "$out/levers/$name.log" | cut -c1-300
        tar czf "$out/levers.tgz" -C "$out" levers
        continue
      fi
      if [ -n "${LATENCY[$name]+x}" ]; then
        # shellcheck disable=SC2086
        python3 -m distill.bench.wan_latency ${LATENCY[$name]} --json "$out/levers/$name.json" 2>&1 | quiet \
          > "$out/levers/$name.log" || { echo "$name: failed; the end of levers/$name.log:"
          tail -n 4 "$out/levers/$name.log" | cut -c1-300; }
        tar czf "$out/levers.tgz" -C "$out" levers
        continue
      fi
      [ -n "${LEVER[$name]+x}" ] || { echo "unknown lever $name" >&2; continue; }
      # shellcheck disable=SC2086
      python3 -m distill.bench.dmd2_step ${LEVER[$name]} --json "$out/levers/$name.json" 2>&1 | quiet \
        > "$out/levers/$name.log" || true
      python3 -c "import json, sys; r = json.load(open(sys.argv[1])); print(sys.argv[2], {k: r.get(k) for k in (
'seconds_per_sample', 'mfu', 'student_update_seconds', 'critic_only_seconds', 'peak_memory_gib')})" \
        "$out/levers/$name.json" "$name" 2>/dev/null || { echo "$name: failed; the end of levers/$name.log:"
        tail -n 4 "$out/levers/$name.log" | cut -c1-300; }  # in the call's output too, should the files not come back
      tar czf "$out/levers.tgz" -C "$out" levers
    done
    tar czf "$out/levers.tgz" -C "$out" levers
    touch "$out/LEVERS_DONE"
    ;;
  scaling)  # issue 17 on a host of several GPUs: DMD2 step of `wan` under the launcher, one JSON per row
    # SCALING="dp:1 dp:2 dp:4 dp:8 sp720:2 sp720:4 sp720:8 zero3-14b:8 zero3-14b-shard:8" (kind:GPUs), in $OUT/scaling/
    mkdir -p "$out/scaling"
    for row in ${SCALING:-dp:1 dp:2}; do
      kind=${row%%:*}; gpus=${row#*:}; args=(--iterations 12)
      case "$kind" in
        dp) ;;  # Wan2.1-1.3B, 480p x 81f, ZeRO-2, data parallel: each rank its own video
        sp720) args+=(--height 720 --width 1280 --set "parallel.sequence_parallel_size=$gpus") ;;  # ~75k tokens
        zero3-14b) args=(--iterations 7 --preset wan2.1-14b --zero-stage 3) ;;  # full-weight roles, ZeRO-3
        zero3-14b-shard) args=(--iterations 7 --preset wan2.1-14b --zero-stage 3 --set roles.teacher.shard=true) ;;
        *) echo "unknown scaling row $row" >&2; continue ;;
      esac
      deepspeed --num_gpus "$gpus" --master_port $((29500 + gpus)) --module distill.bench.dmd2_step "${args[@]}" \
        --output "runs/scaling/$kind-$gpus" --json "$out/scaling/$kind-$gpus.json" "${sets[@]}" 2>&1 | quiet \
        > "$out/scaling/$kind-$gpus.log" || { echo "$row: failed"; tail -n 4 "$out/scaling/$kind-$gpus.log" | cut -c1-300; }
      python3 -c "import json, sys; r = json.load(open(sys.argv[1])); print(sys.argv[2], {k: r.get(k) for k in (
'seconds_per_sample', 'mfu', 'peak_memory_gib', 'ranks', 'sequence_parallel_size')})" \
        "$out/scaling/$kind-$gpus.json" "$row" 2>/dev/null || true
    done
    tar czf "$out/scaling.tgz" -C "$out" scaling
    ;;
  wan)
    python3 -m distill.bench.dmd2_step --iterations 12 --json "$out/wan_dmd2_step.json" 2>&1 | quiet | tail -30
    python3 -m distill.bench.wan_latency --json "$out/wan_latency.json" 2>&1 | quiet | tail -30
    ;;
  *) echo "unknown stage $stage" >&2; exit 2 ;;
esac
