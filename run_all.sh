#!/usr/bin/env bash
# Reproduce the DenseCL results table with one script.
#
#   ./run_all.sh
#       Built-in default: synthetic data, tiny scale, every protocol, report. Creates .venv if
#       needed, writes the synthetic benchmark, pre-trains DenseCL (ResNet-18, tiny preset),
#       evaluates the DenseCL checkpoint and a random-init baseline on all 11 protocols (the
#       weights pre-training starts from, so the two differ by the pre-training alone; evaluated
#       in a second process beside pre-training, log in results/logs/) and writes
#       results/report.md and results/zoo.md. See the README for the measured time.
#       Every protocol runs once per evaluation seed (--seeds, default 0,1,2 here); the report
#       shows mean ± std over them.
#
#   ./run_all.sh --preset paper --data-root DIR [--checkpoint CKPT] [--gpus N]
#                [--nodes N --node-rank R --master-addr HOST --master-port PORT]
#                [--slurm [--partition P] [--timeout-min M]] [--out DIR] [--name NAME]
#                [--seeds S1,S2,...]   (evaluation seeds; default: --seed, i.e. one trial)
#       The real thing through torchrun (pre-training is skipped when --checkpoint is given);
#       --slurm submits the same steps as SLURM jobs with submitit.
set -euo pipefail
cd "$(dirname "$0")"

preset=tiny; data_root=""; checkpoint=""; gpus=1; nodes=1; node_rank=0
master_addr=127.0.0.1; master_port=29500; slurm=0; partition=""; timeout_min=4320
out=results; name=""; seed=0; seeds=""
while [ $# -gt 0 ]; do
  case "$1" in
    --preset) preset="$2"; shift 2;;
    --data-root) data_root="$2"; shift 2;;
    --checkpoint) checkpoint="$2"; shift 2;;
    --gpus) gpus="$2"; shift 2;;
    --nodes) nodes="$2"; shift 2;;
    --node-rank) node_rank="$2"; shift 2;;
    --master-addr) master_addr="$2"; shift 2;;
    --master-port) master_port="$2"; shift 2;;
    --slurm) slurm=1; shift;;
    --partition) partition="$2"; shift 2;;
    --timeout-min) timeout_min="$2"; shift 2;;
    --out) out="$2"; shift 2;;
    --name) name="$2"; shift 2;;
    --seed) seed="$2"; shift 2;;
    --seeds) seeds="$2"; shift 2;;
    -h|--help) sed -n '2,18p' "$0"; exit 0;;
    *) echo "run_all.sh: unknown argument $1 (see --help)" >&2; exit 2;;
  esac
done

source scripts/setup_env.sh
start=$(date +%s)
step() { echo; echo "=== [$(( $(date +%s) - start ))s] $*"; }

if [ "$preset" = tiny ]; then
  seeds="${seeds:-0,1,2}"
  data_root="${data_root:-$out/data}"
  if [ ! -f "$data_root/.densebench-synth-complete" ]; then
    step "1/6 writing the tiny synthetic benchmark to $data_root"
    densebench data synth "$data_root" --scale tiny --seed "$seed"
    touch "$data_root/.densebench-synth-complete"
  fi
  step "2/6 checking the data"
  densebench data check "$data_root"
  # Two single-threaded processes side by side use 2 cores better than one process with two
  # threads (small tensors): the random-init baseline is evaluated in the background while
  # DenseCL pre-trains and is evaluated in the foreground; the baseline's log goes to a file.
  threads=$(( $(nproc) / 2 )); [ "$threads" -ge 1 ] || threads=1
  # the random-init baseline is the exact starting point of the pre-training below (same preset,
  # arch and seed): the two rows then differ by the pre-training, not also by the random draw
  baseline="$out/checkpoints/pretrain_init_resnet18_seed$seed.pth"
  [ -f "$baseline" ] || python -m densebench.evaluate.random_init --arch resnet18 --pretrain-preset tiny \
    --seed "$seed" --out "$baseline"
  mkdir -p "$out/logs"
  baseline_log="$out/logs/evaluate_random_init.log"
  step "3/6 evaluating the random-init baseline on every protocol in the background (log: $baseline_log)"
  OMP_NUM_THREADS=$threads densebench evaluate "$baseline" --data-root "$data_root" --preset tiny --out "$out" \
    --name random_init --seeds "$seeds" > "$baseline_log" 2>&1 &
  baseline_pid=$!
  trap 'kill "$baseline_pid" 2>/dev/null || true' EXIT
  work="$out/pretrain/densecl_tiny"
  if [ -z "$checkpoint" ]; then
    step "4/6 pre-training DenseCL (tiny preset, ResNet-18)"
    resume=(); [ -f "$work/latest" ] && resume=(--resume)
    OMP_NUM_THREADS=$threads densebench pretrain --data "$data_root/imagenet" --work-dir "$work" --preset tiny --arch resnet18 \
      --set seed="$seed" "${resume[@]}"
    checkpoint="$work/$(cat "$work/latest")"
  fi
  step "5/6 evaluating the DenseCL checkpoint on every protocol"
  OMP_NUM_THREADS=$threads densebench evaluate "$checkpoint" --data-root "$data_root" --preset tiny --out "$out" \
    --name "${name:-densecl_tiny}" --seeds "$seeds"
  step "waiting for the random-init baseline (log: $baseline_log)"
  if ! wait "$baseline_pid"; then
    tail -n 5 "$baseline_log" >&2
    echo "run_all.sh: the random-init evaluation failed; its log is $baseline_log" >&2
    exit 1
  fi
  trap - EXIT
  step "6/6 writing the reports"
  densebench report "$out"
  densebench report "$out" --zoo
  step "done: $out/report.md and $out/zoo.md"
  exit 0
fi

if [ "$preset" != paper ]; then echo "run_all.sh: --preset must be tiny or paper" >&2; exit 2; fi
if [ -z "$data_root" ]; then echo "run_all.sh: --preset paper needs --data-root DIR" >&2; exit 2; fi
seeds="${seeds:-$seed}"

if [ "$slurm" = 1 ]; then
  args=(--data-root "$data_root" --out "$out" --gpus "$gpus" --nodes "$nodes" --timeout-min "$timeout_min" --seeds "$seeds")
  [ -n "$checkpoint" ] && args+=(--checkpoint "$checkpoint")
  [ -n "$partition" ] && args+=(--partition "$partition")
  [ -n "$name" ] && args+=(--name "$name")
  exec python -m densebench.slurm "${args[@]}"
fi

launch=(torchrun --nnodes "$nodes" --nproc-per-node "$gpus" --node-rank "$node_rank"
        --master-addr "$master_addr" --master-port "$master_port" -m densebench)
step "checking the data"
densebench data check "$data_root" || echo "some protocols lack data: they will be reported as skipped"
if [ -z "$checkpoint" ]; then
  work="$out/pretrain/densecl_paper"
  step "pre-training DenseCL (paper preset, ResNet-50, 200 epochs) on $nodes node(s) x $gpus GPU(s)"
  resume=(); [ -f "$work/latest" ] && resume=(--resume)
  "${launch[@]}" pretrain --data "$data_root/imagenet" --work-dir "$work" --preset paper "${resume[@]}"
  checkpoint="$work/$(cat "$work/latest")"
fi
step "evaluating $checkpoint on every protocol (paper preset)"
"${launch[@]}" evaluate "$checkpoint" --data-root "$data_root" --preset paper --out "$out" \
  --name "${name:-$(basename "$checkpoint" .pth)}" --seeds "$seeds"
if [ "$node_rank" = 0 ]; then
  step "writing the reports"
  densebench report "$out"
  densebench report "$out" --zoo
fi
