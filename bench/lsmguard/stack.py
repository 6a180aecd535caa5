"""The BPF LSM guard prototype's pieces, for its test, its hook probe and bench/install.

Bench only (issue 16, branch lsmguard): nothing of the product imports this.

* :func:`build`: ``build.sh`` (clang, bpftool, libbpf) into a directory: ``lsmguard-load``
  (the loader, lsmguard.bpf.c inside) and ``hookcost``;
* :class:`Holder`: a user namespace of the bench's own (``unshare --user
  --map-root-user``: inside root is host root, so inside root has DAC override over host
  root's files, as a login's inside root has over them through the idmapped lower), kept
  alive by a ``sleep``; :meth:`Holder.argv` runs a command in it (``nsenter``);
* :class:`Loader`: ``lsmguard-load`` for that namespace; the programs are attached while
  it lives, and :meth:`Loader.stop` (stdin closed, SIGTERM, by its PID) detaches them.

Only the holder's namespace (and namespaces made inside it) is guarded: every other task
of the machine passes the program's first test.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
HOOKS = ("inode_permission", "inode_getattr", "file_open", "inode_getxattr",
         "inode_listxattr", "inode_readlink", "body_cost", "inode_copy_up")


class LsmGuardError(RuntimeError):
    pass


PREBUILT = "SDEEFS_LSMGUARD_PREBUILT"  # a directory build.sh filled elsewhere (vm.py)


def build(out: Path) -> Path:
    """Build into ``out``; the directory (with lsmguard-load and hookcost).  With
    ``$SDEEFS_LSMGUARD_PREBUILT`` set, that directory instead: bench/lsmguard/vm.py builds
    on the host and runs these tools in a guest that has no compiler."""
    if os.environ.get(PREBUILT):
        return Path(os.environ[PREBUILT])
    result = subprocess.run(["sh", str(HERE / "build.sh"), str(out)], capture_output=True,
                            text=True)
    if result.returncode != 0:
        raise LsmGuardError(f"build.sh: {result.stderr.strip()[-400:]}")
    return out


def loadable(binaries: Path) -> str | None:
    """None if this kernel loads the programs (``lsmguard-load --check``), else why not."""
    result = subprocess.run([str(binaries / "lsmguard-load"), "--check"], capture_output=True,
                            text=True)
    if result.returncode == 0:
        return None
    lines = [line for line in result.stderr.splitlines() if line.startswith("lsmguard-load")]
    return (lines[-1] if lines else result.stderr.strip()[-200:]) + (
        " (a BPF LSM program is attached through a BPF trampoline, which patches the hook's "
        "kernel text via ftrace: this kernel refuses fentry/fexit/lsm programs at load)"
        if "Operation not permitted" in result.stderr else "")


def bpf_lsm_active() -> bool:
    try:
        return "bpf" in Path("/sys/kernel/security/lsm").read_text().split(",")
    except OSError:
        return False


def kernel_dev(path: str | os.PathLike[str]) -> str:
    """``MAJ:MIN`` of the filesystem holding ``path`` (its superblock's s_dev)."""
    st = os.lstat(path)
    return f"{os.major(st.st_dev)}:{os.minor(st.st_dev)}"


class Holder:
    """A user namespace of our own, kept by a sleeping process (ended by its PID)."""

    def __init__(self) -> None:
        self.popen = subprocess.Popen(
            ["unshare", "--user", "--map-root-user", "--", "sleep", "infinity"],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
            start_new_session=True)
        host = os.stat("/proc/self/ns/user").st_ino
        deadline = time.monotonic() + 10
        while True:  # until unshare has made the namespace and exec'd sleep
            with contextlib.suppress(OSError):
                ino = os.stat(f"/proc/{self.popen.pid}/ns/user").st_ino
                if ino != host:
                    self.userns = ino
                    break
            if self.popen.poll() is not None or time.monotonic() > deadline:
                err = self.popen.stderr.read().decode() if self.popen.stderr else ""
                self.stop()
                raise LsmGuardError(f"unshare --user: {err.strip() or 'no namespace'}")
            time.sleep(0.01)

    @property
    def pid(self) -> int:
        return self.popen.pid

    def argv(self, argv: Sequence[str | os.PathLike[str]]) -> list[str]:
        """``argv`` run as root inside the namespace (host root's ids, its capabilities
        only in the namespace)."""
        return ["nsenter", f"--user=/proc/{self.pid}/ns/user", "--preserve-credentials",
                "--", *map(os.fspath, argv)]

    def stop(self) -> None:
        if self.popen.poll() is None:
            self.popen.kill()
        self.popen.wait()


class Loader:
    """``lsmguard-load`` guarding ``userns`` for ``uid``/``gid`` on ``devs``."""

    def __init__(self, binary: Path, userns: int, uid: int, gid: int, devs: Sequence[str],
                 groups: Sequence[int] = (), counts: Path | None = None,
                 probe_d_path: bool = False, deny: Sequence[str] = (),
                 deny_root: str = "", body_cost: bool = False,
                 empty_cost: bool = False) -> None:
        argv = [str(binary), "--userns", str(userns), "--uid", str(uid), "--gid", str(gid)]
        for group in groups:
            argv += ["--group", str(group)]
        for dev in devs:
            argv += ["--dev", dev]
        if counts is not None:
            argv += ["--counts", str(counts)]
        if probe_d_path:
            argv.append("--probe-d-path")
        if body_cost:
            argv.append("--body-cost")
        if empty_cost:
            argv.append("--empty-cost")
        for pattern in deny:
            argv += ["--deny", pattern]
        if deny:
            argv += ["--deny-root", deny_root]
        self.counts_path = counts
        # its stderr to a file: a verifier log fills a pipe long before "ready" is read
        self.errors = tempfile.TemporaryFile()  # noqa: SIM115 - lives as long as the loader
        self.popen = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                      stderr=self.errors, start_new_session=True)
        assert self.popen.stdout is not None
        line = self.popen.stdout.readline().decode().strip()
        if line != "ready":
            self.stop()
            self.errors.seek(0)
            lines = [x for x in self.errors.read().decode(errors="replace").splitlines()
                     if x.startswith("lsmguard-load")]
            raise LsmGuardError(f"lsmguard-load: {lines[-1] if lines else 'did not attach'}")

    @property
    def pid(self) -> int:
        return self.popen.pid

    def counts(self) -> Counts:
        """The counters so far (the loader writes them on SIGUSR1)."""
        assert self.counts_path is not None
        with contextlib.suppress(FileNotFoundError):
            self.counts_path.unlink()
        os.kill(self.pid, signal.SIGUSR1)
        deadline = time.monotonic() + 5
        while not self.counts_path.exists():
            if time.monotonic() > deadline:
                raise LsmGuardError("lsmguard-load wrote no counters")
            time.sleep(0.005)
        return parse_counts(self.counts_path.read_text())

    def stop(self) -> None:
        """Detach: close its stdin, then SIGTERM, then SIGKILL (by its PID)."""
        if self.popen.poll() is None:
            with contextlib.suppress(OSError):
                assert self.popen.stdin is not None
                self.popen.stdin.close()
            try:
                self.popen.wait(5)
            except subprocess.TimeoutExpired:
                self.popen.send_signal(signal.SIGTERM)
                try:
                    self.popen.wait(5)
                except subprocess.TimeoutExpired:
                    self.popen.kill()
        self.popen.wait()


@dataclass(frozen=True)
class Counts:
    """Per hook: (calls on host inodes by guarded tasks, denials); with the d_path probe,
    per hook the last path bpf_d_path gave for a guarded task."""

    hooks: dict[str, tuple[int, int]]
    paths: dict[str, str]

    def minus(self, before: Counts) -> dict[str, tuple[int, int]]:
        return {hook: (calls - before.hooks[hook][0], denials - before.hooks[hook][1])
                for hook, (calls, denials) in self.hooks.items()}


def parse_counts(text: str) -> Counts:
    hooks: dict[str, tuple[int, int]] = {}
    paths: dict[str, str] = {}
    for line in text.splitlines():
        name, _, rest = line.partition(" ")
        if name.startswith("d_path:"):
            paths[name.removeprefix("d_path:")] = rest
        else:
            calls, denials = rest.split()
            hooks[name] = (int(calls), int(denials))
    return Counts(hooks, paths)


@dataclass(frozen=True)
class View:
    """A login-like stack on a scratch directory: kernel overlayfs (``userxattr``, as the
    launcher mounts it) over the mask (a tmpfs: ``denied`` of the lower whited out, as
    the deny list does at start) and the lower (a host directory, on the host's own
    filesystem), the upper on a tmpfs of its own."""

    scratch: Path
    lower: Path
    mask: Path
    upper: Path
    view: Path

    @classmethod
    def create(cls, scratch: Path) -> View:
        import sys

        sys.path.insert(0, str(HERE.parents[1]))
        from sdeefs.fs.mask import MaskSpec, build_mask

        os.chmod(scratch, 0o755)  # the guarded user must be able to reach the view
        lower, mask, up, view = (scratch / n for n in ("lower", "mask", "up", "view"))
        for d in (lower, up, view):
            d.mkdir(mode=0o755)
        (lower / "visible").write_text("visible\n")
        (lower / "denied").write_text("denied at start\n")
        (lower / "d").mkdir(mode=0o755)
        (lower / "d" / "known").write_text("known\n")
        _run(["mount", "-t", "tmpfs", "-o", "mode=755", "lsmguard-up", str(up)])
        (up / "upper").mkdir()
        (up / "work").mkdir()
        build_mask(str(mask), str(lower), MaskSpec(hidden=(b"denied",)), b"user.overlay.opaque")
        _run(["mount", "-t", "overlay", "overlay", "-o",
              f"lowerdir={mask}:{lower},upperdir={up}/upper,workdir={up}/work,userxattr",
              str(view)])
        return cls(scratch, lower, mask, up / "upper", view)

    def destroy(self) -> None:
        for mnt in (self.view, self.mask, self.upper.parent):
            subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def _run(argv: Sequence[str]) -> None:
    result = subprocess.run(argv, capture_output=True, text=True)
    if result.returncode != 0:
        raise LsmGuardError(f"{argv[0]}: {result.stderr.strip()}")
