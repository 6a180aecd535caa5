#!/bin/bash
set -u
OUT=/work/wt/sumsfast/bench/out
log() { echo "$(date -u +%H:%M:%S) load $(cut -d' ' -f1-3 /proc/loadavg) $*" >> $OUT/sumsfast-deploy-log2.txt; }
: > $OUT/sumsfast-deploy-log2.txt
run() {  # tree name
  log "start $2 ($1, $(git -C $1 log --oneline -1 | cut -c1-7))"
  (cd $1 && .venv/bin/python bench/deploy/run.py --sizes 1G,2G --methods tar,sdeefs-cold-kernel \
     --scenarios full --repeat 3 --out $OUT/sumsfast-deploy-$2.md) > /tmp/sumsfast-deploy-$2.log 2>&1
  log "end $2 rc=$?"
}
run /work/wt/sumsfast branch3
run /work/wt/sumsfast-base main3
run /work/wt/sumsfast-base main4
run /work/wt/sumsfast branch4
