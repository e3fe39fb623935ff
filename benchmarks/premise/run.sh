#!/usr/bin/env bash
# Issue #27: the CT-SFT premise tested with the oracle circuit (README.md beside this file).
#
#   bash benchmarks/premise/run.sh [STAGE...]          # from the repository root; writes under runs/premise
#
# Stages (default: all, in this order):
#   restore                  copy the tracked results (benchmarks/premise/results) into runs/premise: the cells they hold
#                            are cached again, if the checkpoint has the same bytes (cells are keyed by its content)
#   circuits                 6-head depth-0 circuits of every source, scored by `ctsft discover` on stage 2's 24 examples
#   sweep_b30 grid_b30 report                                        budget A: 30 Acehnese examples x 3 epochs
#   sweep_b90 grid_b90 report                                        budget B: 90 Acehnese examples x 3 epochs
#   rate_check_b90           POST-HOC, not in the default list: the oracle circuit and random heads of budget B at the
#                            head sweep's runner-up rate 1e-3 (acehnese_b90_lr1e-3.toml), report in runs/premise/report_rate_check
#   sweep_b90_heads sweep_b90_norms grid_b90_heads grid_b90_norms
#                            issue #37, on request: the heads-only arms (acehnese_b90_heads.toml: train_norms = false;
#                            circuit, random-layers, nearzero-layers) and the norm-only arm (acehnese_b90_norms.toml),
#                            each with its own target-dev sweep (LRS: its rates, default HEAD_LRS); 5 seeds;
#                            grid_b90_heads runs the primary arms (circuit, random-layers; HEAD_VARIANTS), then
#   grid_b90_heads_anti      the heads-only layer-matched anti-circuit (secondary)
#   grid_b90_with_norms      issue #37: random heads and the oracle WITH norms, and full fine-tuning, re-run on the
#                            heads-only arms' checkpoint (5 seeds; budget B's rates, RATES_with_norms overrides)
#   report_claims            issue #37: the heads-only and with-norms tables and the declared contrasts (norm-only vs
#                            random heads with norms; oracle with norms vs full, with retention) in runs/premise/report_claims
#   grid_b90_shared          issue #37, secondary: every arm at the paper's shared rate 5e-5 (acehnese_b90_shared.toml)
#   TARGET=buginese|javanese sweep_b90 grid_b90: budget B on the other targets (buginese_b90.toml, javanese_b90.toml)
#   save                     copy what the study measured (circuits, sweeps, cells, A0, report, times) into the tracked
#                            results folder, to commit: a fresh machine resumes from it
# Every stage resumes: a circuit file that exists is kept, sweep points and transfer cells are cached by
# their settings. Each stage's command goes to OUT/commands.txt, its wall time, peak RSS and the load average
# before and after to OUT/times.tsv; run nothing else heavy beside it.
# RATES_b30 / RATES_b90 (e.g. head=1e-3,full=1e-6): the grid's rates given instead of read from the sweep folder,
# for a sweep recorded in README.md whose cache is gone (the grid's config.json records the rates it used).
set -euo pipefail
OUT=runs/premise                                   # the TOMLs' paths assume it
HEAD_LRS=${HEAD_LRS:-1e-4,3e-4,1e-3,3e-3,1e-2}     # the head variants' shared sweep, on the oracle circuit (3e-3 added when
                                                   # b30's sweep chose its top, 1e-3, and 1e-2 when b90's chose 3e-3: a rate
                                                   # at the grid's edge is not a pick; cached points are not rerun)
FULL_LRS=${FULL_LRS:-3e-7,1e-6,3e-6,1e-5,3e-5,1e-4}  # full fine-tuning's own sweep (extended down while b30's chose its bottom)
SOURCES=${SOURCES:-patching,attribution-ig}          # the CD-T default (`exact`) ranks heads as patching does: its
                                                   # circuit is the oracle's (README.md); add projection for another rule set
CTSFT=${CTSFT:-ctsft}
HERE=$(dirname "$0")
MODEL=${MODEL:-runs/real_weights/competence/model}  # `benchmarks/real_weights/run.sh MODEL_DIR runs/real_weights competence`
STORE=${STORE:-$HERE/results}                       # tracked: what a fresh clone resumes from
TARGET=${TARGET:-acehnese}                          # sweep_bNN / grid_bNN read TARGET_bNN.toml (issue #37: buginese, javanese)
STAGES=${*:-restore circuits sweep_b30 grid_b30 report sweep_b90 grid_b90 report save}
mkdir -p "$OUT/circuits"

source "$HERE/../stage.sh"

for s in $STAGES; do
  case $s in
    restore)  # never overwrites: what runs/premise holds already wins
      if [ -d "$STORE" ]; then cp -rn "$STORE"/. "$OUT"/; echo "== restore: $STORE -> $OUT"; fi ;;
    circuits)  # stage 2's 24 discovery examples (task.sample(24, "train", seed 0)) and their label-balanced mu;
      # 2 % = 6 heads, depth 0; one scoring pass each, one file each: circuit_<scoring>.json
      missing=()
      for scoring in ${SOURCES//,/ }; do
        [ -f "$OUT/circuits/circuit_$scoring.json" ] && echo "== circuit $scoring exists, kept" || missing+=(--scoring "$scoring")
      done
      if [ ${#missing[@]} -gt 0 ]; then
        if [ ${#missing[@]} -eq 2 ]; then dest="$OUT/circuits/circuit_${missing[1]}.json"; else dest="$OUT/circuits"; fi
        stage circuits "$CTSFT" discover --model "$MODEL" --task nusax-senti --lang indonesian "${missing[@]}" \
          --n-examples 24 --seed 0 --ratio 0.02 --max-depth 0 --heads-per-forward 16 --batch-size 8 \
          --out "$dest" --no-progress
      fi ;;
    sweep_b30|sweep_b90)  # target dev only: 72 label-balanced valid examples, the grid's seed-0 sample
      cfg="$HERE/${TARGET}_${s#sweep_}.toml"
      stage "${s}_heads" python "$HERE/premise.py" sweep --config "$cfg" --variant circuit --lrs "$HEAD_LRS" --no-progress
      stage "${s}_full" python "$HERE/premise.py" sweep --config "$cfg" --variant full --lrs "$FULL_LRS" --no-progress ;;
    grid_b30|grid_b90)  # every arm of every circuit source at the sweep's rates, seed-major
      rates_var="RATES_${s#grid_}"; rates=(); [ -n "${!rates_var:-}" ] && rates=(--rates "${!rates_var}")
      stage "$s" python "$HERE/premise.py" grid --config "$HERE/${TARGET}_${s#grid_}.toml" --sources "$SOURCES" \
        "${rates[@]}" --png --no-progress ;;
    report)  # the table, figure and sentences of every budget with runs so far
      budgets=()
      for b in b30 b90; do
        compgen -G "$OUT/${TARGET}_$b/*/runs/*/*/seed*.json" > /dev/null && budgets+=(--budget "$OUT/${TARGET}_$b")
      done
      stage report python "$HERE/premise.py" report "${budgets[@]}" --out "$OUT/report" --png ;;
    sweep_b90_heads|sweep_b90_norms)  # issue #37: the heads-only and norm-only arms' own target-dev sweeps
      cfg="$HERE/acehnese_${s#sweep_}.toml"; v=circuit; [ "$s" = sweep_b90_norms ] && v=norm-only
      stage "$s" python "$HERE/premise.py" sweep --config "$cfg" --variant "$v" --lrs "${LRS:-$HEAD_LRS}" --no-progress ;;
    grid_b90_heads|grid_b90_norms)  # issue #37: heads only (circuit, random-layers, nearzero-layers), norm-only; 5 seeds
      name=acehnese_${s#grid_}
      for f in a0.json a0.json.key; do  # A0 does not depend on the arms: share one of this checkpoint's (its key is checked)
        src=$OUT/acehnese_b90_heads/patching; [ -f "$src/$f" ] || src=$OUT/acehnese_b90/patching
        [ -f "$src/$f" ] && [ ! -e "$OUT/$name/patching/$f" ] && mkdir -p "$OUT/$name/patching" \
          && cp "$src/$f" "$OUT/$name/patching/$f"
      done
      variants=(); [ "$s" = grid_b90_heads ] && variants=(--variants "${HEAD_VARIANTS:-circuit,random-layers}")
      stage "$s" python "$HERE/premise.py" grid --config "$HERE/$name.toml" --sources patching "${variants[@]}" \
        --no-progress ;;
    grid_b90_heads_anti)  # issue #37, secondary: the layer-matched anti-circuit, heads only (after the primary arms)
      stage "$s" python "$HERE/premise.py" grid --config "$HERE/acehnese_b90_heads.toml" --sources patching \
        --variants nearzero-layers --no-progress ;;
    grid_b90_with_norms)  # issue #37: budget B's reference arms (random heads and oracle WITH norms, full) on the
      # heads-only arms' checkpoint, 5 seeds, at budget B's sweep picks (acehnese_b90_with_norms.toml says why)
      name=acehnese_b90_with_norms
      for f in a0.json a0.json.key; do  # the heads-only grid's A0 (same checkpoint; its key is checked)
        [ -f "$OUT/acehnese_b90_heads/patching/$f" ] && [ ! -e "$OUT/$name/patching/$f" ] && mkdir -p "$OUT/$name/patching" \
          && cp "$OUT/acehnese_b90_heads/patching/$f" "$OUT/$name/patching/$f"
      done
      stage "$s" python "$HERE/premise.py" grid --config "$HERE/$name.toml" --sources patching \
        --rates "${RATES_with_norms:-head=3e-3,full=3e-6}" --no-progress ;;
    report_claims)  # issue #37: the declared comparisons across budget B's folders (after grid_b90_with_norms)
      H=$OUT/acehnese_b90_heads; N=$OUT/acehnese_b90_norms; W=$OUT/acehnese_b90_with_norms
      stage "$s" python "$HERE/premise.py" report --budget "$H" --budget "$W" --out "$OUT/report_claims" --png \
        --contrast "norm-only vs random heads with norms=$N:patching/norm-only,$W:patching/random-layers" \
        --contrast "oracle with norms vs full fine-tuning=$W:patching/circuit,$W:patching/full" ;;
      # (heads-only random vs random with norms, the secondary, is refused: heads-only seed 0 predates the
      # cells' record of their checkpoint, and a contrast never pairs cells it cannot place on one checkpoint)
    grid_b90_shared)  # issue #37, secondary: every arm at the paper's shared rate 5e-5 (no sweep)
      stage "$s" python "$HERE/premise.py" grid --config "$HERE/acehnese_b90_shared.toml" --sources patching \
        --rates head=5e-5,full=5e-5 --no-progress ;;
    rate_check_b90)  # does the b90 verdict hang on the head sweep's pick (3e-3 over 1e-3 by two dev examples)?
      stage "$s" python "$HERE/premise.py" grid --config "$HERE/acehnese_b90_lr1e-3.toml" --sources patching \
        --rates head=1e-3 --no-progress
      stage "${s}_report" python "$HERE/premise.py" report --budget "$OUT/acehnese_b90_lr1e-3" \
        --out "$OUT/report_rate_check" --png ;;
    save)  # small files only (no model, no HTML): JSON results with their cache keys, tables, the figure, the logs of times
      mkdir -p "$STORE"; store=$(cd "$STORE" && pwd)
      (cd "$OUT" && find . -type f \( -path './circuits/*' -o -path '*/sweep/*' -o -name 'seed*.json' -o -name 'seed*.json.key' \
        -o -name 'a0.json' -o -name 'a0.json.key' -o -name config.json -o -name times.tsv -o -name commands.txt \
        -o -path './report*/premise.md' -o -path './report*/premise.json' -o -path './report*/premise.png' \) \
        ! -name '*.html' -print0 | xargs -0 -r cp --parents -t "$store")
      echo "== save: $OUT -> $STORE ($(find "$STORE" -type f | wc -l) files; commit them)" ;;
    *) echo "unknown stage $s" >&2; exit 2 ;;
  esac
done
