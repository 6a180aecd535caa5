#!/usr/bin/env python3
"""Run the BPF LSM prototype's tools on a kernel that loads BPF LSM programs: Debian 12's
own, booted under qemu (issue 16, bench only).

Usage (as root)::

    .venv/bin/python bench/lsmguard/vm.py [tests|hooks|cost|check|product|meta] [--kernel PKG]
        [--work DIR] [--rootfs-tar TAR] [--timeout S] [--icount] [--meta-args ARGS]
        [--command SHELL]

Why: this machine's kernel refuses every program that attaches through a BPF trampoline
(bench/RESULTS.md, "a BPF LSM prototype"), and it has no hardware virtualisation, so the
guest runs under qemu's software emulation (TCG): right for *what happens* (which hooks
fire, what is hidden, whether the verifier takes the programs), meaningless for absolute
times (``cost`` prints them, for ratios inside one run only).

What it does, cached in ``--work`` (default ``/var/tmp/sdeefs-lsmvm``):

1. a root filesystem: ``--rootfs-tar`` (a ``debootstrap --variant=minbase bookworm``
   tarball, e.g. the one ``$FRESH_CACHE`` names for ../shared/tools/fresh-machine.sh) or
   ``debootstrap`` itself; then, in a chroot, python3, pytest, attrs, libbpf1, kmod and
   the kernel package ``--kernel`` (``apt-get download``; default: Debian 12's 6.12
   cloud kernel: ``CONFIG_BPF_LSM=y``, ``bpf`` in ``CONFIG_LSM``, BTF for vmlinux and
   modules), whose post-install makes the initramfs;
2. every run: ``build.sh`` on the host (clang, bpftool: apt-get install -y clang
   libbpf-dev bpftool), the result and this repository's ``sdeefs/`` and
   ``bench/lsmguard/`` copied into the root, an ext4 image made from it (``mkfs.ext4
   -d``), and the kernel booted with a shell script as PID 1 that mounts proc, sys,
   securityfs, bpffs, loads overlay, runs the command with ``SDEEFS_LSMGUARD_PREBUILT``
   set (the guest has no compiler) and powers off;
   ``product`` also builds ``sdeefs-enter`` and copies ``launcher/`` and the pure-Python
   packages the launcher's kernel engine needs (PYDEPS) from ``.venv``: it runs
   bench/lsmguard/test_product.py, login environments started by the launcher with
   ``guard = "bpf"`` (the product's ``sdeefs-bpfguard``, built by ``build.sh``);
   ``meta`` builds the same and also copies bench/install's meta tree into the root
   (:func:`meta_tree`): bench/lsmguard/metaguest.py walks it through a plain overlay and
   through login views, with the program attached, detached, and the FUSE guard instead;
3. the serial console is kept in ``WORK/serial.log``; what the command printed is
   shown and its exit status returned.  A boot that dies before the command (seen once
   in a few dozen boots: an int3 oops while the kernel patches its own text under
   multi-threaded TCG) is retried, at most twice.

``--icount``: the guest's clock counts its instructions (:func:`boot`), so what the
guest measures does not depend on the host's load: for ``meta``.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
KERNEL = "linux-image-6.12.107+deb12-cloud-amd64-unsigned"
GUEST_PACKAGES = ["python3", "python3-pytest", "python3-attr", "libbpf1", "libelf1", "zlib1g",
                  "initramfs-tools", "kmod", "util-linux", "procps", "libfuse3-3"]
COMMANDS = {
    "tests": "python3 -m pytest -v -rs --color=no -p no:cacheprovider "
             "bench/lsmguard/test_lsmguard.py",
    "hooks": "python3 bench/lsmguard/hooks.py",
    "cost": "python3 bench/lsmguard/hookcost.py --calls 20000 --rounds 3 --reps 2",
    "check": "/opt/lsmbuild/lsmguard-load --check",
    # the product's guard in login environments started by the launcher (test_product.py)
    "product": "env SDEEFS_BPFGUARD_BIN=/opt/lsmbuild/sdeefs-bpfguard "
               "SDEEFS_GUARD_BIN=/opt/lsmbuild/sdeefs-guard "
               "SDEEFS_ENTER=/opt/lsmbuild/sdeefs-enter SDEEFS_SHELL=/opt/lsmbuild/sdeefs-shell "
               "PYTHONPATH=/opt/sdeefs:/opt/sdeefs/pydeps python3 -m pytest -v --color=no "
               "--tb=short -rsP -p no:cacheprovider bench/lsmguard/test_product.py",
    # metadata walks through login views, the program attached and not (metaguest.py;
    # vm.py copies bench/install's meta tree into the root: meta_tree)
    "meta": "env SDEEFS_BPFGUARD_BIN=/opt/lsmbuild/sdeefs-bpfguard "
            "SDEEFS_GUARD_BIN=/opt/lsmbuild/sdeefs-guard "
            "SDEEFS_ENTER=/opt/lsmbuild/sdeefs-enter SDEEFS_SHELL=/opt/lsmbuild/sdeefs-shell "
            "PYTHONPATH=/opt/sdeefs:/opt/sdeefs/pydeps python3 bench/lsmguard/metaguest.py run",
}
# What the launcher's Python needs beyond the guest's python3-attr, pytest: pure Python
# (the kernel engine's capture runs on trio), copied from this checkout's .venv
PYDEPS = ("trio", "outcome", "sniffio", "sortedcontainers", "idna")
BEGIN, END = "== sdeefs-vm: begin", "== sdeefs-vm: end rc "

INIT = """#!/bin/sh
# PID 1 of the guest (bench/lsmguard/vm.py): mount, run the command, power off.
mount -t proc proc /proc
mount -t sysfs sys /sys 2>/dev/null
mount -t devtmpfs dev /dev 2>/dev/null
mount -t securityfs securityfs /sys/kernel/security
mount -t bpf bpf /sys/fs/bpf
mount -t tmpfs tmpfs /tmp
mount -t tmpfs tmpfs /run
mount -o remount,rw /
modprobe overlay
modprobe loop
modprobe fuse
cd /opt/sdeefs
echo "== kernel $(uname -r), LSMs $(cat /sys/kernel/security/lsm)"
echo "{begin}"
SDEEFS_LSMGUARD_PREBUILT=/opt/lsmbuild {command} 2>&1
echo "{end}$?"
sync
echo o > /proc/sysrq-trigger
sleep 30
"""


class VmError(Exception):
    """One line for the user: what failed."""


def run(argv: list[str], **kwargs: object) -> None:
    result = subprocess.run(argv, capture_output=True, text=True, check=False,
                            **kwargs)  # type: ignore[call-overload]
    if result.returncode != 0:
        raise VmError(f"{' '.join(argv[:4])}: {(result.stderr or result.stdout).strip()[-300:]}")


def base_root(work: Path, kernel: str, rootfs_tar: Path | None) -> Path:
    """The guest's root with its packages and kernel (made once)."""
    root, ready = work / "root", work / "root.ready"
    if ready.exists() and ready.read_text() == kernel:
        packages = work / "root.packages"
        if not packages.exists() or packages.read_text() != " ".join(GUEST_PACKAGES):
            in_chroot(root, "export DEBIAN_FRONTEND=noninteractive; apt-get update -q && "
                      f"apt-get install -y -q --no-install-recommends {' '.join(GUEST_PACKAGES)}")
            packages.write_text(" ".join(GUEST_PACKAGES))  # (a root made before the list grew)
        return root
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    if rootfs_tar is not None:
        run(["tar", "xf", str(rootfs_tar), "-C", str(root)])
    else:
        run(["debootstrap", "--variant=minbase", "bookworm", str(root)])
    debs = work / "debs"
    debs.mkdir(exist_ok=True)
    run(["apt-get", "download", kernel], cwd=debs)
    deb = next(debs.glob(f"{kernel}_*.deb"))
    shutil.copy(deb, root / "tmp" / deb.name)
    shutil.copy("/etc/resolv.conf", root / "etc" / "resolv.conf")
    binds = [root / "proc", root / "sys", root / "dev"]
    for target in binds:
        run(["mount", "--bind", f"/{target.name}", str(target)])
    try:
        run(["chroot", str(root), "sh", "-c",
             "export DEBIAN_FRONTEND=noninteractive; apt-get update -q && "
             f"apt-get install -y -q --no-install-recommends {' '.join(GUEST_PACKAGES)} && "
             f"dpkg -i /tmp/{deb.name} && rm /tmp/{deb.name}"])
    finally:
        for target in reversed(binds):
            subprocess.run(["umount", str(target)], check=False)
    ready.write_text(kernel)
    (work / "root.packages").write_text(" ".join(GUEST_PACKAGES))
    return root


def in_chroot(root: Path, script: str) -> None:
    shutil.copy("/etc/resolv.conf", root / "etc" / "resolv.conf")
    binds = [root / "proc", root / "sys", root / "dev"]
    for target in binds:
        run(["mount", "--bind", f"/{target.name}", str(target)])
    try:
        run(["chroot", str(root), "sh", "-c", script])
    finally:
        for target in reversed(binds):
            subprocess.run(["umount", str(target)], check=False)


def prepare(work: Path, root: Path, command: str) -> Path:
    """Build on the host, copy into the root, make the image; its path."""
    build = work / "build"
    shutil.rmtree(build, ignore_errors=True)
    run(["sh", str(HERE / "build.sh"), str(build)])
    # the launcher's namespace helper, for the product's login environments (sdeefs-shell:
    # the same binary under that name); the host is Debian 12 too: the same libc
    run(["make", "-s", "-C", str(REPO / "launcher" / "enter"), f"OUT={build / 'sdeefs-enter'}"])
    (build / "sdeefs-shell").symlink_to("sdeefs-enter")
    opt = root / "opt"
    for name in ("lsmbuild", "sdeefs"):
        shutil.rmtree(opt / name, ignore_errors=True)
    shutil.copytree(build, opt / "lsmbuild", symlinks=True)
    ignore = shutil.ignore_patterns("__pycache__", "*.so")
    shutil.copytree(REPO / "sdeefs", opt / "sdeefs" / "sdeefs", ignore=ignore)
    shutil.copytree(REPO / "launcher", opt / "sdeefs" / "launcher", ignore=ignore)
    shutil.copytree(HERE, opt / "sdeefs" / "bench" / "lsmguard", ignore=ignore)
    (opt / "sdeefs" / "bench" / "__init__.py").touch()
    site = next((REPO / ".venv" / "lib").glob("python3*/site-packages"))
    for name in PYDEPS:
        shutil.copytree(site / name, opt / "sdeefs" / "pydeps" / name, ignore=ignore)
    # the guard layer (guard = "c"): its C daemon and, for the launcher's sdeefs.fs.mount,
    # pyfuse3 with its extension (cpython-311, libfuse3: as the guest's)
    shutil.copy(REPO / ".venv" / "bin" / "sdeefs-guard", opt / "lsmbuild" / "sdeefs-guard")
    shutil.copytree(site / "pyfuse3", opt / "sdeefs" / "pydeps" / "pyfuse3",
                    ignore=shutil.ignore_patterns("__pycache__"))
    init = root / "sbin" / "sdeefs-vm-init"
    init.write_text(INIT.replace("{begin}", BEGIN).replace("{end}", END)
                    .replace("{command}", command))
    init.chmod(0o755)
    image = work / "root.img"
    image.unlink(missing_ok=True)
    run(["mkfs.ext4", "-q", "-d", str(root), "-L", "sdeefsvm", str(image), "3G"])
    return image


def meta_tree(root: Path) -> None:
    """bench/install's meta tree (its Python standard library and /usr/include, without
    byte code and site-packages) at /srv/sdeefs-meta/tree in the root, with ``list`` (every
    entry's path relative to it, NUL-separated, sorted), an empty directory ``empty`` and
    ``emptylist`` (``.``: stat's start-up cost):
    metaguest.py's input."""
    sys.path.insert(0, str(REPO))
    from bench.install.run import INCLUDE, _ignore, find_stdlib

    meta = root / "srv" / "sdeefs-meta"
    shutil.rmtree(meta, ignore_errors=True)
    for source in (find_stdlib(), INCLUDE):
        shutil.copytree(source, meta / "tree" / source.name, symlinks=True, ignore=_ignore)
    (meta / "empty").mkdir()
    (meta / "emptylist").write_bytes(b".\0")
    names = sorted(os.path.relpath(os.path.join(top, name), meta / "tree")
                   for top, dirs, files in os.walk(meta / "tree") for name in dirs + files)
    (meta / "list").write_bytes(b"".join(os.fsencode(n) + b"\0" for n in names))


def boot(work: Path, root: Path, image: Path, timeout: float, icount: bool = False) -> str:
    """Boot once; the serial console's text.

    ``icount``: qemu's ``-icount shift=0,sleep=off``: the guest's clocks (its TSC, timers,
    CLOCK_MONOTONIC) advance one nanosecond per guest instruction executed, and an idle
    guest jumps to its next timer instead of sleeping, so a time measured inside the guest
    is the number of instructions every guest CPU executed in it, whatever the host's load.
    icount needs single-threaded TCG; one CPU, so that the count is of one CPU's
    instructions in sequence (two CPUs would be run in turn by the one thread and their
    counts summed).  Not counted: anything the host does for the guest (qemu's device
    emulation, disk I/O: a walk measured so must not wait for the disk; caches, memory
    latency, mispredictions: every instruction costs the same ns)."""
    kernel = sorted((root / "boot").glob("vmlinuz-*"))[-1]
    initrd = root / "boot" / kernel.name.replace("vmlinuz-", "initrd.img-")
    serial = work / "serial.log"
    serial.unlink(missing_ok=True)
    accel = (["-accel", "tcg,thread=single", "-smp", "1", "-icount", "shift=0,sleep=off"]
             if icount else ["-accel", "tcg,thread=multi", "-smp", "2"])
    argv = ["qemu-system-x86_64", "-machine", "q35", *accel,
            "-cpu", "max", "-m", "3G", "-kernel", str(kernel),
            "-initrd", str(initrd), "-append",
            "root=/dev/vda rw console=ttyS0 init=/sbin/sdeefs-vm-init panic=-1 quiet",
            "-drive", f"file={image},if=virtio,format=raw", "-nographic", "-no-reboot",
            "-serial", f"file:{serial}", "-monitor", "none", "-display", "none"]
    try:
        subprocess.run(argv, capture_output=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        raise VmError(f"the guest did not power off in {timeout:.0f} s "
                      f"(console: {serial})") from None
    return serial.read_text(errors="replace")


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("what", nargs="?", default="tests", choices=sorted(COMMANDS))
    parser.add_argument("--kernel", default=KERNEL, help="Debian kernel package")
    parser.add_argument("--work", type=Path, default=Path("/var/tmp/sdeefs-lsmvm"))
    parser.add_argument("--rootfs-tar", type=Path,
                        default=Path(os.environ["FRESH_CACHE"])
                        if os.environ.get("FRESH_CACHE") else None)
    parser.add_argument("--timeout", type=float, default=1800)
    parser.add_argument("--icount", action="store_true",
                        help="-icount shift=0,sleep=off: the guest's clock counts its "
                        "instructions (one ns each; one CPU, single-threaded TCG)")
    parser.add_argument("--meta-args", default="",
                        help="appended to meta's command (e.g. '--rounds 5 --repeats 2')")
    parser.add_argument("--command", help="run this shell command in the guest instead "
                        "(from the repository's copy, /opt/sdeefs)")
    args = parser.parse_args()
    try:
        if shutil.which("qemu-system-x86_64") is None:
            raise VmError("no qemu-system-x86_64 (apt-get install -y qemu-system-x86)")
        args.work.mkdir(parents=True, exist_ok=True)
        root = base_root(args.work, args.kernel, args.rootfs_tar)
        if args.what == "meta":
            meta_tree(root)
        command = args.command or COMMANDS[args.what]
        if args.what == "meta" and not args.command and args.meta_args:
            command += " " + args.meta_args
        image = prepare(args.work, root, command)
        for _attempt in range(3):
            console = boot(args.work, root, image, args.timeout, args.icount)
            if BEGIN in console:
                break
        else:
            raise VmError(f"the guest died before the command three times "
                          f"(console: {args.work / 'serial.log'})")
    except VmError as exc:
        print(f"vm.py: {exc}", file=sys.stderr)
        return 1
    header = re.findall(r"== kernel .*", console)
    body = console.split(BEGIN, 1)[1]
    output, _, rest = body.partition(END)
    print(*header, sep="\n")
    print(re.sub(r"(?m)^\[ *\d+\.\d+\] .*\n", "", output).strip("\r\n"))
    match = re.match(r"\d+", rest)
    if match is None:
        print(f"vm.py: the command did not finish (console: {args.work / 'serial.log'})",
              file=sys.stderr)
        return 1
    return int(match.group())


if __name__ == "__main__":
    sys.exit(main())
