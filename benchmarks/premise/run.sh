#!/usr/bin/env bash
# Issue #27: the CT-SFT premise tested with the oracle circuit (README.md beside this file).
#
#   bash benchmarks/premise/run.sh [STAGE...]          # from the repository root; writes under runs/premise
#
# Stages (default: all, in this order):
#   circuits                 6-head depth-0 circuits of every source, read from the compare run's tables (no rescoring)
#   sweep_b30 grid_b30 report                                        budget A: 30 Acehnese examples x 3 epochs
#   sweep_b90 grid_b90 report                                        budget B: 90 Acehnese examples x 3 epochs
# Every stage resumes: a circuit file that exists is kept, sweep points and transfer cells are cached by
# their settings. Each stage's command goes to OUT/commands.txt, its wall time, peak RSS and the load average
# before and after to OUT/times.tsv; run nothing else heavy beside it.
set -euo pipefail
OUT=runs/premise                                   # the TOMLs' paths assume it
HEAD_LRS=${HEAD_LRS:-1e-4,3e-4,1e-3,3e-3}          # the head variants' shared sweep, on the oracle circuit (3e-3 added when
                                                   # b30's sweep chose its top, 1e-3: a rate at the grid's edge is not a pick)
FULL_LRS=${FULL_LRS:-3e-7,1e-6,3e-6,1e-5,3e-5,1e-4}  # full fine-tuning's own sweep (extended down while b30's chose its bottom)
SOURCES=${SOURCES:-patching,attribution-ig,projection}
CTSFT=${CTSFT:-ctsft}
HERE=$(dirname "$0")
COMPARE=${COMPARE:-runs/real_weights/compare_faithful/compare.json}  # README: the `compare_faithful` command
STAGES=${*:-circuits sweep_b30 grid_b30 report sweep_b90 grid_b90 report}
mkdir -p "$OUT/circuits"

source "$HERE/../stage.sh"

for s in $STAGES; do
  case $s in
    circuits)  # the 24 discovery examples and mu of the compare run (stage 2's sample, task.sample(24, "train", seed 0)),
      # each source's table as that run scored it; 2 % = 6 heads, depth 0, chosen as `ctsft discover` chooses
      for scoring in ${SOURCES//,/ }; do
        file="$OUT/circuits/circuit_$scoring.json"
        if [ -f "$file" ]; then echo "== circuit $scoring: $file exists, kept"; continue; fi
        stage "circuit_$scoring" python "$HERE/../real_weights/circuit_from_compare.py" "$COMPARE" --method "$scoring" \
          --ratio 0.02 --out "$file"
      done ;;
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
