# Sourced by the benchmark drivers (real_weights/run.sh, premise/run.sh): one stage = one timed, logged command.
#
#   OUT=runs/...; HIDE=/path/not/to/log    # HIDE (optional): shown as MODEL_DIR in the logged command
#   source "$(dirname "$0")/../stage.sh"
#   stage NAME CMD...
#
# The command goes to OUT/commands.txt, its output to OUT/NAME.log, and its wall time, peak RSS and the load
# average before and after to OUT/times.tsv (the tables of RESULTS quote that file).
stage() {  # stage NAME CMD...: run, time, log
  local name=$1; shift
  local load0; load0=$(cut -d' ' -f1 /proc/loadavg)
  local shown="$*"
  [ -n "${HIDE:-}" ] && shown=${shown//"$HIDE"/MODEL_DIR}  # no machine path in a log a table may quote
  echo "== $name: $shown" | tee -a "$OUT/commands.txt"
  /usr/bin/time -f "%e %M" -o "$OUT/.time" "$@" 2>&1 | tee "$OUT/$name.log"
  read -r secs rss < "$OUT/.time"
  printf '%s\t%s s\t%s MB\tload %s -> %s\t%s\n' "$name" "$secs" "$((rss / 1024))" "$load0" \
    "$(cut -d' ' -f1 /proc/loadavg)" "$(date -u +%FT%TZ)" | tee -a "$OUT/times.tsv"
}
