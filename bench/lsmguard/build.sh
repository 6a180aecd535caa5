#!/bin/sh
# Build the BPF LSM prototype (bench only): build.sh OUTDIR -> OUTDIR/lsmguard-load, OUTDIR/hookcost,
# and the product's loader OUTDIR/sdeefs-bpfguard (launcher/login/bpf: the same guard program).
# Needs: apt-get install -y clang libbpf-dev bpftool (Debian 12: bpftool from bookworm)
set -eu
here=$(cd "$(dirname "$0")" && pwd)
product="$here/../../launcher/login/bpf"
out=${1:?usage: build.sh OUTDIR}
mkdir -p "$out"
out=$(cd "$out" && pwd)
bpftool=$(command -v bpftool || ls /usr/sbin/bpftool 2>/dev/null)
[ -s "$out/vmlinux.h" ] || "$bpftool" btf dump file /sys/kernel/btf/vmlinux format c > "$out/vmlinux.h"
clang -g -O2 -target bpf -D__TARGET_ARCH_x86 -I"$out" -I"$product" -c "$here/lsmguard.bpf.c" -o "$out/lsmguard.bpf.o"
"$bpftool" gen skeleton "$out/lsmguard.bpf.o" name lsmguard_bpf > "$out/lsmguard.skel.h"
cc -O2 -Wall -I"$out" -I"$product" -o "$out/lsmguard-load" "$here/loader.c" -lbpf -lelf -lz
cc -O2 -Wall -o "$out/hookcost" "$here/hookcost.c"
cc -O2 -static -o "$out/spin" "$here/spin.c"
cc -O2 -static -o "$out/true-static" -x c - <<'C'
int main(void) { return 0; }
C
make -s -C "$product" OUT="$out/sdeefs-bpfguard" BUILD="$out/product" BPFTOOL="$bpftool"
