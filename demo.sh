#!/usr/bin/env bash
# The sdeefs demo: mount a copy-on-write environment over this machine's own root,
# change it as root would (new program, edited /etc, deleted file), show what changed,
# stream the change to a simulated compute node (its own network namespace, its own
# sdeefs-replicad) and run a job there over the replica, then unmount and check that the
# host did not change and the journal agrees with the upper.
# Run as root on Debian 12.  Leaves nothing mounted or running, even when interrupted.
set -euo pipefail
cd "$(dirname "$0")"
./scripts/setup.sh
SDEEFS="$PWD/.venv/bin/sdeefs"
ENGINE="${1:-hybrid}"            # hybrid (kernel overlayfs over the journaling upper) or fuse

DEMO=$(mktemp -d /var/tmp/sdeefs-demo.XXXXXX)
U="$DEMO/root/demo"                 # ROOT/USER: the layout the launcher uses
mkdir -p "$U/upper" "$U/state" "$DEMO/view" "$DEMO/node"
NS=sdd$$                            # network namespaces: ${NS}l (login), ${NS}c (compute)
PIDS=()
cleanup() {
  for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
  for pid in "${PIDS[@]}"; do wait "$pid" 2>/dev/null || true; done
  ip netns del "${NS}l" 2>/dev/null || true
  ip netns del "${NS}c" 2>/dev/null || true
  if grep -q " $DEMO/view " /proc/mounts; then "$SDEEFS" umount "$DEMO/view" || umount -l "$DEMO/view"; fi
  for m in "$U/state/mnt" "$U/state/mask" "$DEMO/node"; do grep -q " $m " /proc/mounts && umount -l "$m"; done
  rm -rf --one-file-system "$DEMO"
}
trap cleanup EXIT
step() { printf '\n\033[1m== %s\033[0m\n' "$*"; }

step "mount: lower = / (read-only), upper = $DEMO/upper, engine = $ENGINE"
"$SDEEFS" mount --engine "$ENGINE" --lower / --upper "$U/upper" --state "$U/state" "$DEMO/view"
grep -E " $DEMO/(view|root/demo/state/mnt) " /proc/mounts | awk '{print "  " $3 " on " $2}'

step "change the environment as its root user would"
V="$DEMO/view"
mkdir -p "$V/usr/local/bin" "$V/etc/profile.d"
printf '#!/bin/sh\necho "hello from inside the sdeefs view (host: $(cat /etc/hostname))"\n' > "$V/usr/local/bin/hello-sdeefs"
chmod 755 "$V/usr/local/bin/hello-sdeefs"
echo 'export SDEEFS_DEMO=1' > "$V/etc/profile.d/sdeefs-demo.sh"
echo '# edited inside the view' >> "$V/etc/bash.bashrc"
rm -f "$V/etc/motd"
chroot "$V" /usr/local/bin/hello-sdeefs

step "sdeefs diff: what this user added, changed and deleted"
"$SDEEFS" diff --upper "$U/upper" --lower /

step "sdeefs log: the journal (last 8 records)"
"$SDEEFS" log --upper "$U/upper" --state "$U/state" | tail -n 8

step "replicate: login node and compute node in their own network namespaces"
ip netns add "${NS}l"; ip netns add "${NS}c"
ip link add "${NS}a" netns "${NS}l" type veth peer name "${NS}b" netns "${NS}c"
ip -n "${NS}l" addr add 10.251.0.1/24 dev "${NS}a"; ip -n "${NS}l" link set "${NS}a" up
ip -n "${NS}c" addr add 10.251.0.2/24 dev "${NS}b"; ip -n "${NS}c" link set "${NS}b" up
head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n' > "$DEMO/key"; chmod 600 "$DEMO/key"
# The compute node's local disk: replicas must not share a filesystem with the lower (/).
mount -t tmpfs -o mode=0755,size=1g sdeefs-demo-node "$DEMO/node"
REPLICAD="$PWD/.venv/bin/sdeefs-replicad"
nsenter --net="/run/netns/${NS}l" -- "$REPLICAD" --key-file "$DEMO/key" --node login \
  --origin "$DEMO/root" --listen 10.251.0.1:7077 --control "$DEMO/login.sock" 2>"$DEMO/login.log" &
PIDS+=($!)
nsenter --net="/run/netns/${NS}c" -- "$REPLICAD" --key-file "$DEMO/key" --node node1 \
  --replica-dir "$DEMO/node/replicas" --upstream 10.251.0.1:7077 --control "$DEMO/node1.sock" \
  2>"$DEMO/node1.log" &
PIDS+=($!)
for _ in $(seq 100); do [ -S "$DEMO/node1.sock" ] && [ -S "$DEMO/login.sock" ] && break; sleep 0.05; done
echo "  node1 follows user 'demo' and waits for the login node's journal head (the SLURM prolog's step):"
"$SDEEFS" replica follow demo --wait --control "$DEMO/node1.sock" | sed 's/^/    /'
"$SDEEFS" replica status --control "$DEMO/node1.sock" | sed 's/^/    /'
echo "  one more edit streams by itself:"
echo 'export SDEEFS_DEMO=2' > "$V/etc/profile.d/sdeefs-demo.sh"
"$SDEEFS" replica follow demo --wait --control "$DEMO/node1.sock" | sed 's/^/    /'

step "a job on node1: kernel overlayfs over a scratch upper, the replica and the node's own /"
J="$DEMO/node/job1"; mkdir -p "$J/upper" "$J/work" "$J/root"
nsenter --net="/run/netns/${NS}c" -- unshare --mount --pid --fork --uts -- sh -c "
  hostname node1
  mount -t overlay job1 -o lowerdir=$DEMO/node/replicas/demo/upper:/,upperdir=$J/upper,workdir=$J/work $J/root
  mount -t proc proc $J/root/proc
  chroot $J/root sh -c '/usr/local/bin/hello-sdeefs; . /etc/profile.d/sdeefs-demo.sh; echo \"  SDEEFS_DEMO=\$SDEEFS_DEMO\"; ls /etc/motd 2>/dev/null || echo \"  /etc/motd: deleted in the environment, deleted on the node\"'
" | sed 's/^/  /'
rm -rf "$J"
echo "  job done: its scratch upper is gone, the replica stays for the next job"

step "unmount, then check the upper against its journal"
"$SDEEFS" umount "$V"
"$SDEEFS" check --upper "$U/upper" --state "$U/state"

step "the host is unchanged"
for f in /usr/local/bin/hello-sdeefs /etc/profile.d/sdeefs-demo.sh; do
  [ -e "$f" ] && { echo "  UNEXPECTED: $f exists on the host"; exit 1; } || echo "  $f: not on the host"
done
grep -q "edited inside the view" /etc/bash.bashrc && { echo "  UNEXPECTED: host bashrc changed"; exit 1; } || echo "  /etc/bash.bashrc: unchanged on the host"
echo
echo "demo ok"
