#!/usr/bin/env bash
# Images/s of the README demo (`ummae pretrain`, the demo preset, capped at STEPS optimizer steps)
# with three thread/worker settings, idle and beside a competing CPU load, interleaved:
#   old   the code of OLD_SRC (before engine/cpus.py: the demo preset's 2 workers + torch's default threads)
#   new   this tree's defaults (fitted to the usable CPUs: on 2 CPUs 1 worker + 1 intra-op thread)
#   new0  this tree with --workers 0 (then 2 intra-op threads on 2 CPUs)
# The load is LOAD busy Python loops at the same niceness as the run (nice 0), started before and
# stopped after each loaded run. Everything is written under OUT (default: a temporary folder),
# never in the repository. Usage, from the repository root:
#   OLD_SRC=/path/to/old/src scripts/bench_cpu_defaults.sh [REPS] [STEPS]
# One line per run: rep, load, variant, images/s (from the closing summary), the 1-minute load
# average before the run, and whether stderr had a torch warning about the number of workers.
set -u
REPS=${1:-3}
STEPS=${2:-24}
LOAD=${LOAD:-2}
PY=${PY:-python}
OLD_SRC=${OLD_SRC:?set OLD_SRC to the src/ folder of the old code}
OUT=${OUT:-$(mktemp -d)}
mkdir -p "$OUT"
echo "# out $OUT, $REPS reps, $STEPS steps, load = $LOAD busy loops, $(nproc) CPUs"

one() {  # variant load rep
  local variant=$1 load=$2 rep=$3 src=src extra=()
  [ "$variant" = old ] && src=$OLD_SRC
  [ "$variant" = new0 ] && extra=(--workers 0)
  local pids=()
  if [ "$load" = loaded ]; then
    for _ in $(seq "$LOAD"); do nice -n 0 "$PY" -c 'while True: pass' & pids+=($!); done
    sleep 1
  fi
  local avg; avg=$(cut -d' ' -f1 /proc/loadavg)
  local dir=$OUT/$variant-$load-$rep
  PYTHONPATH=$src "$PY" -m ummae pretrain --max-steps "$STEPS" --save-every 0 --out "$dir" "${extra[@]}" \
    >"$dir.out" 2>"$dir.err"
  for p in "${pids[@]}"; do kill "$p"; done
  wait "${pids[@]}" 2>/dev/null
  local ips; ips=$(grep -o '([0-9.]* images/s' "$dir.out" | tr -d '(' | cut -d' ' -f1)
  local warned=no; grep -qi "worker" "$dir.err" && warned=yes
  echo "$rep $load $variant ${ips:-FAILED} load1=$avg worker_warning=$warned"
}

for rep in $(seq "$REPS"); do
  for load in idle loaded; do
    for variant in old new new0; do one "$variant" "$load" "$rep"; done
  done
done
