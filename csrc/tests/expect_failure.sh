#!/usr/bin/env bash
# Runs a planted-bug build that MUST fail: succeeds only if the command exits
# non-zero AND its output contains the expected evidence (e.g. a TSAN race
# report in the ring kernel, or the watchdog dump), so the checkers stay honest.
# Usage: expect_failure.sh LABEL EVIDENCE_REGEX LOG_FILE -- COMMAND...
set -u
label=$1 evidence=$2 log=$3
shift 4
start_ns=$(date +%s%N)
"$@" >"$log" 2>&1
status=$?
elapsed_ms=$(( ($(date +%s%N) - start_ns) / 1000000 ))
if [[ $status -ne 0 ]] && grep -Eq "$evidence" "$log"; then
  printf '[ OK ] planted bug caught: %-34s (exit %d, %d ms)\n' "$label" "$status" "$elapsed_ms"
  exit 0
fi
if [[ $status -eq 0 ]]; then
  echo "[FAIL] planted bug NOT caught: $label: the run succeeded (see $log)"
else
  echo "[FAIL] planted bug $label: the run failed (exit $status) but without evidence matching '$evidence' (see $log)"
fi
tail -n 40 "$log"
exit 1
