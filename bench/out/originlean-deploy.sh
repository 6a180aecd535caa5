#!/bin/sh
# branch, main, main, branch: bench/deploy/run.py from each worktree with its own tree on
# the path (main: /work/wt/originlean-base, 6d8aaec, its C extensions built)
set -e
B=/work/wt/originlean
M=/work/wt/originlean-base
run() {  # NAME TREE
    echo "$1 start $(date -u +%H:%M:%S) load $(cut -d' ' -f1 /proc/loadavg)"
    (cd "$2" && PYTHONPATH="$2" $B/.venv/bin/python bench/deploy/run.py --sizes 1G,2G \
        --methods tar,sdeefs-cold-kernel --scenarios full --repeat 3 \
        --out $B/bench/out/originlean-deploy-$1.md > $B/bench/out/originlean-deploy-$1.log 2>&1)
    echo "$1 end $(date -u +%H:%M:%S) load $(cut -d' ' -f1 /proc/loadavg)"
}
run branch1 $B
run main1 $M
run main2 $M
run branch2 $B
