#!/usr/bin/env bash
# Repeated `find` / `ls -R` through protofs with and without FOPEN_CACHE_DIR.
# usage: bench_cachedir.sh SOURCE MOUNTPOINT PYTHON   (prints one line per pass)
set -euo pipefail
src=$1; mnt=$2; py=$3
here=$(cd "$(dirname "$0")" && pwd)
if [ ! -d "$src" ]; then  # 1,410 directories, 5,944 entries (issue 16's find benchmark shape)
  mkdir -p "$src"
  python3 - "$src" <<'PY'
import os, random, sys
random.seed(1)
os.chdir(sys.argv[1])
dirs = [""]
while len(dirs) < 1410:
    d = os.path.join(random.choice(dirs), f"d{len(dirs)}")
    os.makedirs(d)
    dirs.append(d)
for i in range(5945 - 1410):
    with open(os.path.join(random.choice(dirs) or ".", f"f{i}"), "w") as f:
        f.write("x" * random.randint(0, 300))
PY
fi
for mode in ${MODES:-plain cache-dir}; do
  flag=(); [ $mode = cache-dir ] && flag=(--cache-dir); [ $mode = no-opendir ] && flag=(--no-opendir)
  stats=$(mktemp)
  "$py" "$here/protofs.py" "$src" "$mnt" "${flag[@]}" --stats "$stats" & pid=$!
  for _ in $(seq 50); do grep -q " $mnt fuse" /proc/mounts && break; sleep 0.1; done
  for pass in 1 2 3 4; do
    t0=$(date +%s.%N); find "$mnt" > /dev/null; t1=$(date +%s.%N)
    printf '%-9s find  pass %d: %.3f s\n' $mode $pass "$(echo "$t1 - $t0" | bc)"
  done
  for pass in 1 2; do
    t0=$(date +%s.%N); ls -R "$mnt" > /dev/null; t1=$(date +%s.%N)
    printf '%-9s ls -R pass %d: %.3f s\n' $mode $pass "$(echo "$t1 - $t0" | bc)"
  done
  kill $pid; wait $pid || true
  printf '%-9s requests: %s\n' $mode "$(cat "$stats")"
  rm -f "$stats"
done
