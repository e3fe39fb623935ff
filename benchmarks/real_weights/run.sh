#!/usr/bin/env bash
# Real-weights evidence (issues #14 and #17) on the Qwen2.5-0.5B-shaped stand-in, CPU.
#
#   python ../shared/tools/real-qwen MODEL_DIR          # once, about a minute
#   bash benchmarks/real_weights/run.sh MODEL_DIR runs/real_weights [STAGE...]
#
# Stages (default: all, in order): competence, compare, stability, circuit, sweep, transfer; on request:
# depths, necessity (after depths), transfer_depth2 (after depths and transfer); with the faithful CD-T rules
# (issue #26): compare_faithful, depths_faithful (after compare_faithful), necessity_faithful. Each stage's wall time, peak RSS and
# the load average before and after go to OUT/times.tsv; run nothing else heavy beside it.
set -euo pipefail
MODEL=${1:?model folder}; OUT=${2:-runs/real_weights}; shift 2 || true
STAGES=${*:-competence compare stability circuit sweep transfer}
SWEEP=${SWEEP:-circuit:1e-4 circuit:1e-3 full:1e-5 full:1e-4 circuit:3e-4 full:3e-5 lora:1e-4 lora:3e-4 lora:1e-3}
CTSFT=${CTSFT:-ctsft}
mkdir -p "$OUT"

HIDE=$MODEL
source "$(dirname "$0")/../stage.sh"

for s in $STAGES; do
  case $s in
    competence)  # >= 120 label-balanced Indonesian examples; test accuracy on 90
      stage competence "$CTSFT" competence --model "$MODEL" --task nusax-senti --lang indonesian \
        --n-examples 120 --epochs 2 --lr 1e-5 --batch-size 8 --test-limit 90 --seed 0 \
        --out "$OUT/competence" --no-progress ;;
    compare)  # 24 discovery / 90 evaluation examples, bootstrap CIs, 5 random circuits per size
      stage compare "$CTSFT" compare --model "$OUT/competence/model" --task nusax-senti --lang indonesian \
        --method projection --method attribution --method attribution-ig \
        --n-discovery 24 --n-eval 90 --split test --points 4 --max-size 68 --seeds 5 \
        --batch-size 8 --eval-batch-size 16 --plotlyjs cdn --png --out "$OUT/compare" ;;
    compare_faithful)  # issue #26 item 6: the faithful rules (then the default) beside the public code's rules, attribution,
      # IG and the exact patching table (issue #27's oracle), on stage 2's examples; each scoring pass cached in
      # OUT/compare_faithful/cache. --decomposition faithful: the default is `exact` now (= the patching row)
      stage compare_faithful "$CTSFT" compare --model "$OUT/competence/model" --task nusax-senti --lang indonesian \
        --decomposition faithful --method projection --method attribution --method attribution-ig --method patching --method projection@cdt-paper \
        --heads-per-forward 16 --n-discovery 24 --n-eval 90 --split test --points 4 --max-size 68 --seeds 5 \
        --batch-size 8 --eval-batch-size 16 --plotlyjs cdn --png --out "$OUT/compare_faithful" --no-progress ;;
    depths_faithful)  # stage 7 with the faithful rules, checked against compare_faithful's depth-0 table
      stage depths_faithful python "$(dirname "$0")/depths.py" "$OUT/competence/model" --out "$OUT/depths_faithful" \
        --decomposition faithful --compare "$OUT/compare_faithful/compare.json" --no-progress ;;
    depths)  # projection AND magnitude at depths 0-2 from ONE CD-T pass (every head a target), judged on stage 2's evaluation
      # (as run on 2026-12-02, with 0.2's default rules)
      stage depths python "$(dirname "$0")/depths.py" "$OUT/competence/model" --out "$OUT/depths" --decomposition shapley \
        --compare "$OUT/compare/compare.json" --no-progress ;;
    necessity)  # the random-ablation control of depths' necessity column: judges only the new tables, merges into depths.json
      stage necessity python "$(dirname "$0")/depths.py" "$OUT/competence/model" --out "$OUT/depths" \
        --decomposition shapley --phase random-necessity --no-progress ;;
    necessity_faithful)  # the same control for depths_faithful
      stage necessity_faithful python "$(dirname "$0")/depths.py" "$OUT/competence/model" --out "$OUT/depths_faithful" \
        --decomposition faithful --phase random-necessity --no-progress ;;
    stability)  # split-half stability of each ranking, from compare's per-example tables (no model run)
      stage stability python "$(dirname "$0")/stability.py" "$OUT/compare/compare.json" --splits 50 \
        --out "$OUT/stability" ;;
    circuit)  # the depth-0 projection circuit of the compare run (6 of 336 heads), no rescoring
      stage circuit python "$(dirname "$0")/circuit_from_compare.py" "$OUT/compare/compare.json" \
        --method projection --ratio 0.02 --out "$OUT/circuit_depth0.json" ;;
    sweep)  # learning rate per variant on SOURCE dev only: 30 Indonesian train examples (seed 1), 60 dev
      for cell in $SWEEP; do
        v=${cell%%:*}; lr=${cell#*:}
        stage "sweep_${v}_$lr" "$CTSFT" train --model "$OUT/competence/model" --task nusax-senti --lang indonesian \
          --variant "$v" --circuit "$OUT/circuit_depth0.json" --lr "$lr" --n-examples 30 --epochs 3 \
          --batch-size 10 --seed 1 --dev-limit 60 --test-limit 3 --select-best --no-progress \
          --out "$OUT/sweep/${v}_$lr"
      done
      stage sweep_pick python "$(dirname "$0")/sweep_pick.py" "$OUT/sweep" ;;
    transfer)  # the grid of transfer.toml (its paths assume OUT=runs/real_weights; resumable: finished cells are kept)
      stage transfer "$CTSFT" experiment --config "$(dirname "$0")/transfer.toml" --png --no-progress ;;
    transfer_depth2)  # transfer_depth2.toml: the depth-2 projection circuit (18 heads) vs 18 random heads; the full
      # cells are transfer's (same settings, and their cache key has no circuit in it): copied, not retrained
      for full in "$OUT"/transfer/runs/*/full; do
        t=$(basename "$(dirname "$full")")
        mkdir -p "$OUT/transfer_depth2/runs/$t"
        cp -rn "$full" "$OUT/transfer_depth2/runs/$t/"
      done
      cp -n "$OUT/transfer/a0.json" "$OUT/transfer/a0.json.key" "$OUT/transfer_depth2/"
      stage transfer_depth2 "$CTSFT" experiment --config "$(dirname "$0")/transfer_depth2.toml" --png --no-progress ;;
    *) echo "unknown stage $s" >&2; exit 2 ;;
  esac
done
