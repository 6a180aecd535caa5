#!/bin/bash
# colddrain A/B: branch (sumsfast) and main (sumsfast-base) alternating, one script (the branch's)
set -u
cd /work/wt/sumsfast
OUT=${1:-bench/out/sumsfast-drain-ab.jsonl}
: > "$OUT"
for pair in $(seq 1 ${PAIRS:-3}); do
  for tree in /work/wt/sumsfast-base /work/wt/sumsfast; do
    name=$(basename $tree)
    echo "{\"release\": \"$name\", \"pair\": $pair, \"utc\": \"$(date -u +%H:%M:%S)\", \"load\": \"$(cut -d' ' -f1-3 /proc/loadavg)\"}" >> "$OUT"
    PYTHONPATH=$tree .venv/bin/python bench/deploy/colddrain.py --size 1G --runs 1 \
      --work /var/tmp/sumsfast-drain >> "$OUT" 2>>/tmp/sumsfast-drain-ab.err
  done
done
