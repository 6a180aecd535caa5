#!/usr/bin/env python3
"""Which LSM hooks fire on the host's inode when a task of the environment goes through
overlayfs, and what bpf_d_path gives there (issue 16, branch lsmguard; bench only).

Usage (as root)::

    .venv/bin/python bench/lsmguard/hooks.py [--build DIR]

Builds the prototype, makes the test's stack (bench/lsmguard/stack.py: overlayfs over a
mask and a host directory, upper on a tmpfs), starts a user namespace and the loader
(with the d_path probe), then one Python process inside the namespace performs one
operation at a time while this harness reads the program's counters before and after
each: the calls of each hook on host inodes by the guarded task, and its denials.
Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from bench.lsmguard.stack import (  # noqa: E402
    HOOKS,
    Holder,
    Loader,
    View,
    build,
    kernel_dev,
    loadable,
)

WORKER = r"""
import errno, os, subprocess, sys
def run(op, p):
    if op == "lstat": os.lstat(p)
    elif op == "read":
        with open(p, "rb") as f: f.read()
    elif op == "listdir": os.listdir(p)
    elif op == "readlink": os.readlink(p)
    elif op == "exec": subprocess.run([p], check=True)
    elif op == "getxattr":
        try: os.getxattr(p, "user.test", follow_symlinks=False)
        except OSError as exc:
            if exc.errno != errno.ENODATA: raise
    elif op == "listxattr": os.listxattr(p, follow_symlinks=False)
    elif op == "copy-up-write": os.close(os.open(p, os.O_WRONLY))
    elif op == "copy-up-chmod": os.chmod(p, 0o644)
for line in sys.stdin:
    op, p = line.split(" ", 1)
    try:
        run(op, p.strip()); res = "ok"
    except OSError as exc:
        res = errno.errorcode.get(exc.errno, str(exc.errno))
    except subprocess.CalledProcessError as exc:
        res = f"exit {exc.returncode}"
    print(res, flush=True)
"""


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--build", type=Path, help="build directory (default: a temporary one)")
    args = parser.parse_args()
    scratch = Path(tempfile.mkdtemp(prefix="lsmguard-hooks-", dir="/var/tmp"))
    binaries = build(args.build or scratch / "build")
    why = loadable(binaries)
    if why is not None:
        shutil.rmtree(scratch, ignore_errors=True)
        print(f"hooks.py: the kernel does not load the programs: {why}", file=sys.stderr)
        return 1
    view = View.create(scratch)
    holder = Holder()
    loader = None
    worker = None
    try:
        lower, v = view.lower, view.view
        (lower / "f1").write_text("one\n")
        (lower / "f2").write_text("two\n")
        (lower / "f3").write_text("three\n")
        os.symlink("f1", lower / "link")
        shutil.copy(binaries / "true-static", lower / "tool")
        (lower / "sub").mkdir()
        (lower / "sub" / "x").write_text("x\n")
        (lower / "secret").write_text("root only\n")
        os.chmod(lower / "secret", 0o600)
        loader = Loader(binaries / "lsmguard-load", holder.userns, 1000, 1000,
                        devs=[kernel_dev(lower)], counts=scratch / "counts", probe_d_path=True)
        worker = subprocess.Popen(holder.argv(["/usr/bin/python3", "-c", WORKER]),
                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                                  cwd="/")
        assert worker.stdin is not None
        assert worker.stdout is not None
        steps = [
            ("lstat", v / "f1", "lstat, first (lookup through the layers)"),
            ("lstat", v / "f1", "lstat, repeated (dentry cached)"),
            ("read", v / "f2", "open + read"),
            ("listdir", v / "sub", "opendir + getdents"),
            ("lstat", v / "sub" / "x", "lstat of an entry below a merged directory"),
            ("readlink", v / "link", "readlink"),
            ("exec", v / "tool", "exec (a static binary)"),
            ("getxattr", v / "f1", "getxattr user.test"),
            ("listxattr", v / "f1", "listxattr"),
            ("copy-up-write", v / "f3", "open for writing: copy-up"),
            ("copy-up-chmod", v / "f2", "chmod: copy-up"),
            ("lstat", v / "secret", "lstat of a 0600 root file"),
            ("read", v / "secret", "open of a 0600 root file"),
            ("copy-up-chmod", v / "secret", "chmod of a 0600 root file (copy-up)"),
        ]
        rows = []
        paths: dict[str, str] = {}
        for op, path, label in steps:
            before = loader.counts()
            worker.stdin.write(f"{op} {path}\n")
            worker.stdin.flush()
            result = worker.stdout.readline().strip()
            after = loader.counts()
            diff = after.minus(before)
            fired = ", ".join(f"{hook} {calls}" + (f" (denied {denials})" if denials else "")
                              for hook, (calls, denials) in diff.items() if calls)
            rows.append(f"| {label} | {result} | {fired or 'none'} |")
            paths.update({f"{hook} after {label}": p for hook, p in after.paths.items()})
        print("| operation through the view (task in the guarded namespace) | result | "
              "hooks on the host inode: calls |")
        print("| --- | --- | --- |")
        print("\n".join(rows))
        print()
        print(f"lower: {lower}")
        print(json.dumps(paths, indent=1))
        print(f"hooks counted: {', '.join(HOOKS)}")
    finally:
        if worker is not None:
            if worker.stdin:
                worker.stdin.close()
            worker.wait(10)
        if loader is not None:
            loader.stop()
        holder.stop()
        view.destroy()
        shutil.rmtree(scratch, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
