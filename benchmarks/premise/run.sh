#!/usr/bin/env bash
# Issue #27: the CT-SFT premise tested with the oracle circuit (README.md beside this file).
#
#   bash benchmarks/premise/run.sh [STAGE...]          # from the repository root; writes under runs/premise
#
# Stages (default: all, in this order):
#   discover_patching discover_attribution-ig discover_projection   6-head depth-0 circuits, stage 2's 24 examples and mu
#   sweep_b30 grid_b30 report                                        budget A: 30 Acehnese examples x 3 epochs
#   sweep_b90 grid_b90 report                                        budget B: 90 Acehnese examples x 3 epochs
# Every stage resumes: a circuit file that exists is kept, sweep points and transfer cells are cached by
# their settings. Each stage's command goes to OUT/commands.txt, its wall time, peak RSS and the load average
# before and after to OUT/times.tsv; run nothing else heavy beside it.
set -euo pipefail
OUT=runs/premise                                   # the TOMLs' paths assume it
COMP=${COMP:-runs/real_weights/competence/model}   # `benchmarks/real_weights/run.sh MODEL_DIR runs/real_weights competence`
HEAD_LRS=${HEAD_LRS:-1e-4,3e-4,1e-3}               # the head variants' shared sweep, on the oracle circuit
FULL_LRS=${FULL_LRS:-1e-5,3e-5,1e-4}               # full fine-tuning's own sweep
SOURCES=${SOURCES:-patching,attribution-ig,projection}
CTSFT=${CTSFT:-ctsft}
HERE=$(dirname "$0")
STAGES=${*:-discover_patching discover_attribution-ig discover_projection sweep_b30 grid_b30 report sweep_b90 grid_b90 report}
mkdir -p "$OUT/circuits"

stage() {  # stage NAME CMD...: run, time, log
  local name=$1; shift
  local load0; load0=$(cut -d' ' -f1 /proc/loadavg)
  echo "== $name: $*" | tee -a "$OUT/commands.txt"
  /usr/bin/time -f "%e %M" -o "$OUT/.time" "$@" 2>&1 | tee "$OUT/$name.log"
  read -r secs rss < "$OUT/.time"
  printf '%s\t%s s\t%s MB\tload %s -> %s\t%s\n' "$name" "$secs" "$((rss / 1024))" "$load0" \
    "$(cut -d' ' -f1 /proc/loadavg)" "$(date -u +%FT%TZ)" | tee -a "$OUT/times.tsv"
}

for s in $STAGES; do
  case $s in
    discover_*)  # the same 24 label-balanced Indonesian train examples (task.sample(24, "train", seed 0)) and the
      # same mu (their label-balanced head means) as benchmarks/real_weights' compare stage; 2 % = 6 heads, depth 0
      scoring=${s#discover_}
      file="$OUT/circuits/circuit_$scoring.json"
      if [ -f "$file" ]; then echo "== $s: $file exists, kept"; continue; fi
      extra=()
      [ "$scoring" = projection ] && extra=(--decomposition faithful)
      stage "$s" "$CTSFT" discover --model "$COMP" --task nusax-senti --lang indonesian --scoring "$scoring" \
        "${extra[@]}" --ratio 0.02 --max-depth 0 --n-examples 24 --seed 0 --batch-size 8 --out "$file" --no-progress ;;
    sweep_b30|sweep_b90)  # target (Acehnese) dev only: 72 label-balanced valid examples, the grid's seed-0 sample
      cfg="$HERE/acehnese_${s#sweep_}.toml"
      stage "${s}_heads" python "$HERE/premise.py" sweep --config "$cfg" --variant circuit --lrs "$HEAD_LRS" --no-progress
      stage "${s}_full" python "$HERE/premise.py" sweep --config "$cfg" --variant full --lrs "$FULL_LRS" --no-progress ;;
    grid_b30|grid_b90)  # every arm of every circuit source at the sweep's rates, seed-major
      stage "$s" python "$HERE/premise.py" grid --config "$HERE/acehnese_${s#grid_}.toml" --sources "$SOURCES" \
        --png --no-progress ;;
    report)  # the table, figure and sentences of every budget with runs so far
      budgets=()
      for b in b30 b90; do
        compgen -G "$OUT/acehnese_$b/*/runs/*/*/seed*.json" > /dev/null && budgets+=(--budget "$OUT/acehnese_$b")
      done
      stage report python "$HERE/premise.py" report "${budgets[@]}" --out "$OUT/report" --png ;;
    *) echo "unknown stage $s" >&2; exit 2 ;;
  esac
done
