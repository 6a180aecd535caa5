"""A daemon's CPU by kind of work, from ``coldcpu.py --perf``'s ``perf record -g`` data.

Usage::

    python bench/deploy/coldcpu_perf.py FILE.data [--hz 499]

Per process (the login node's origin, the replica): CPU seconds (samples / Hz), then
the share of each kind: the kernel's copies (page cache to a user buffer, a user buffer
to the page cache, a user buffer to a socket, a socket to a user buffer), the rest of
the file syscalls, page faults, the network stack (softirqs: on loopback the receiving
side's TCP runs in the sender's context), the MAC (libcrypto), Python (the
interpreter, ctypes, libffi), libc (memset, memmove, malloc), zlib, other kernel work.
The leaf frame decides, and where it is the kernel, the first syscall or fault on the
call chain.
"""

from __future__ import annotations

import argparse
import collections
import re
import subprocess

COPIES = {
    "copy_folio_from_iter_atomic": "copy: user -> page cache (write)",
    "filemap_read": "copy: page cache -> user (read)",
    "tcp_sendmsg_locked": "copy: user -> socket",
    "tcp_recvmsg_locked": "copy: socket -> user",
    "skb_copy_datagram_iter": "copy: socket -> user",
}


def kind(frames: list[tuple[str, str]]) -> str:
    sym, dso = frames[0]
    if "kernel" not in dso:
        lib = dso.rsplit("/", 1)[-1]
        if lib.startswith("libcrypto"):
            return "MAC (libcrypto)"
        if lib.startswith(("python", "_ctypes", "libffi")) or lib.endswith(".so") \
                and "cpython" in lib and not lib.startswith("_applyc"):
            return "Python (interpreter, ctypes)"
        if lib.startswith("libc"):
            return "libc (memset, memmove, malloc)"
        if lib.startswith("libz"):
            return "zlib (crc32)"
        return f"user: {lib}"
    names = [s for s, _ in frames]
    if sym.startswith(("_copy_to_iter", "_copy_from_iter", "copy_folio_from_iter_atomic",
                       "copy_page_to_iter", "copy_user", "rep_movs")):
        for name in names:
            if name in COPIES:
                return COPIES[name]
    for name in names:
        if "softirq" in name or name.startswith(("net_rx_action", "__netif_receive")):
            return "network stack (softirq)"
        if name in ("asm_exc_page_fault", "exc_page_fault"):
            return "page faults"
        if name.startswith(("__x64_sys_", "__do_sys_")):
            call = re.sub(r"^__(x64|do)_sys_", "", name)
            return f"syscall {call} (other than its copy)"
        if name.startswith(("do_writev", "do_preadv", "do_readv", "ksys_pwrite", "ksys_pread")):
            return f"syscall {name} (other than its copy)"
    return "kernel: other (scheduling, ...)"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("file")
    parser.add_argument("--hz", type=int, default=499)
    parser.add_argument("--min", type=float, default=0.8, help="least share shown (%%)")
    args = parser.parse_args()
    out = subprocess.run(["perf", "script", "-i", args.file, "-F", "pid,tid,comm,ip,sym,dso"],
                         capture_output=True, text=True, check=True).stdout
    kinds: dict[str, collections.Counter[str]] = collections.defaultdict(collections.Counter)
    for sample in out.split("\n\n"):
        lines = [line.strip() for line in sample.strip().splitlines()]
        match = re.search(r"(\d+)/\d+", lines[0]) if lines else None
        if match is None:
            continue
        frames = []
        for line in lines[1:]:
            parts = line.split(None, 1)
            if len(parts) == 2:
                sym, _, dso = parts[1].rpartition(" (")
                frames.append((sym.split("+")[0], dso.rstrip(")")))
        if frames:
            kinds[match.group(1)][kind(frames)] += 1
    for pid, counts in sorted(kinds.items(), key=lambda item: -sum(item[1].values())):
        total = sum(counts.values())
        print(f"pid {pid}: {total} samples, {total / args.hz:.2f} s of CPU")
        for what, n in counts.most_common():
            if 100 * n / total >= args.min:
                print(f"   {100 * n / total:5.1f}%  {n / args.hz:5.2f} s  {what}")


if __name__ == "__main__":
    main()
