#!/usr/bin/env bash
# The sdeefs demo: mount a copy-on-write environment over this machine's own root,
# change it as root would (new program, edited /etc, deleted file), show what changed,
# unmount, and check that the host did not change and the journal agrees with the upper.
# Run as root on Debian 12.  Leaves nothing mounted, even when interrupted.
set -euo pipefail
cd "$(dirname "$0")"
./scripts/setup.sh
SDEEFS="$PWD/.venv/bin/sdeefs"
ENGINE="${1:-hybrid}"            # hybrid (kernel overlayfs over the journaling upper) or fuse

DEMO=$(mktemp -d /var/tmp/sdeefs-demo.XXXXXX)
mkdir -p "$DEMO/upper" "$DEMO/view"
cleanup() {
  if grep -q " $DEMO/view " /proc/mounts; then "$SDEEFS" umount "$DEMO/view" || umount -l "$DEMO/view"; fi
  for m in "$DEMO/state/mnt" "$DEMO/state/mask"; do grep -q " $m " /proc/mounts && umount -l "$m"; done
  rm -rf --one-file-system "$DEMO"
}
trap cleanup EXIT
step() { printf '\n\033[1m== %s\033[0m\n' "$*"; }

step "mount: lower = / (read-only), upper = $DEMO/upper, engine = $ENGINE"
"$SDEEFS" mount --engine "$ENGINE" --lower / --upper "$DEMO/upper" --state "$DEMO/state" "$DEMO/view"
grep -E " $DEMO/(view|state/mnt) " /proc/mounts | awk '{print "  " $3 " on " $2}'

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
"$SDEEFS" diff --upper "$DEMO/upper" --lower /

step "sdeefs log: the journal (last 8 records)"
"$SDEEFS" log --upper "$DEMO/upper" --state "$DEMO/state" | tail -n 8

step "unmount, then check the upper against its journal"
"$SDEEFS" umount "$V"
"$SDEEFS" check --upper "$DEMO/upper" --state "$DEMO/state"

step "the host is unchanged"
for f in /usr/local/bin/hello-sdeefs /etc/profile.d/sdeefs-demo.sh; do
  [ -e "$f" ] && { echo "  UNEXPECTED: $f exists on the host"; exit 1; } || echo "  $f: not on the host"
done
grep -q "edited inside the view" /etc/bash.bashrc && { echo "  UNEXPECTED: host bashrc changed"; exit 1; } || echo "  /etc/bash.bashrc: unchanged on the host"
echo
echo "demo ok"
