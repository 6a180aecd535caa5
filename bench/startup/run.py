"""Start-up cost of an isolated environment: ms per start of ``/bin/true``.

Usage (as root)::

    .venv/bin/python bench/startup/run.py [--n 100] [--out FILE]

Contenders (every one runs ``/bin/true`` N times in a row):

* ``fork-exec``: plain ``/bin/true`` (the loop's own cost, for reference);
* ``bare``: ``unshare --pid --fork --mount --mount-proc chroot OVERLAY /bin/true`` where
  OVERLAY is a kernel overlay of ``/`` with an empty upper layer (the bare mechanism; the
  ratio column is relative to it);
* ``sdeefs-join``: ``sdeefs-enter join --pid PID -- /bin/true`` as the user, joining a
  running sdeefs environment;
* ``sdeefs-shell``: ``sdeefs-shell -c /bin/true`` as the user (join + ``bash -c``);
* ``runuser-baseline`` and ``sdeefs-join+runuser``: ``runuser -u U -- [sdeefs-enter join
  ...] /bin/true`` started by root each time, so the join cost can also be read as
  "with runuser minus runuser alone";
* ``bwrap``, ``ch-run`` (image: a kernel overlay of ``/``) and ``podman`` (``--rootfs``: a
  kernel overlay of ``/``), each skipped with a reason if unavailable.

Measurement: each batch is a ``sh`` loop of 10 starts (for the user contenders the loop
runs inside one ``runuser``'d shell, so runuser is not counted), timed inside the shell
with ``date +%s%N``; batches are interleaved round-robin over N/10 rounds and the median
batch gives ms per start.  A cold start (``sdeefs start`` + ``sdeefs stop``: FUSE daemon,
idmapped mounts, mask, namespaces, plus the ``python -m sdeefs`` CLI start) is timed
separately over a smaller count.
"""

from __future__ import annotations

import argparse
import shlex
import shutil
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from bench.common import (  # noqa: E402
    BenchSession,
    CommandTimeout,
    HostInfo,
    KernelOverlayContender,
    MountError,
    log,
    render_markdown_table,
    render_text_table,
    require_root,
    run_command,
)

VENV_BIN = Path(__file__).resolve().parents[2] / ".venv" / "bin"
ENTER = VENV_BIN / "sdeefs-enter"
SHELL = VENV_BIN / "sdeefs-shell"
BATCH = 10
BATCH_TIMEOUT = 300.0

# $1 = count, the rest = the command.  Prints the loop's wall time in ns.
LOOP = (
    'n=$1; shift; t0=$(date +%s%N); i=0; '
    'while [ "$i" -lt "$n" ]; do "$@" >/dev/null </dev/null || exit 97; i=$((i+1)); done; '
    't1=$(date +%s%N); echo $((t1 - t0))'
)
# Hide the cgroup v1/v2 hybrid "unified" mount from crun (private mount namespace).
PODMAN_WRAP = [
    "unshare", "--mount", "--propagation", "private", "sh", "-c",
    'umount -l /sys/fs/cgroup/unified 2>/dev/null; exec sh -c "$0" sh "$@"',
]


@dataclass
class Contender:
    name: str
    command: list[str]
    user: str | None = None  # run the loop as this user (one runuser for the whole loop)
    env: dict[str, str] = field(default_factory=dict)
    wrap: list[str] = field(default_factory=list)  # instead of ["sh", "-c"] around LOOP
    samples: list[float] = field(default_factory=list)  # ms per start, one per batch
    error: str | None = None

    def argv(self, count: int) -> list[str]:
        loop = [*self.wrap, LOOP] if self.wrap else ["sh", "-c", LOOP, "sh"]
        env = [f"{k}={v}" for k, v in self.env.items()]
        if self.user is not None:
            return ["runuser", "-u", self.user, "--", "env", *env, *loop, str(count),
                    *self.command]
        return ["env", *env, *loop, str(count), *self.command]

    def shown(self) -> str:
        prefix = f"[as {self.user}, in one runuser'd sh loop] " if self.user else ""
        return prefix + shlex.join(self.command)


def run_batch(session: BenchSession, contender: Contender, count: int) -> float | None:
    """ms per start of one batch, or None (and ``contender.error`` set) on failure."""
    try:
        result = run_command(contender.argv(count), session.tracker, timeout=BATCH_TIMEOUT,
                             cwd="/")
    except CommandTimeout as exc:
        contender.error = str(exc)
        return None
    if not result.ok or not result.stdout.strip().isdigit():
        contender.error = result.failure_reason()
        return None
    return int(result.stdout.strip()) / count / 1e6


def overlay_of_root(session: BenchSession, label: str) -> Path:
    assert session.mounts is not None
    return session.mounts.mount(KernelOverlayContender(), Path("/"), label).view


def build_contenders(session: BenchSession, user: str, pid: int, run_dir: Path,
                     home: Path) -> tuple[list[Contender], dict[str, str]]:
    unavailable: dict[str, str] = {}
    user_env = {"SDEEFS_RUN_DIR": str(run_dir), "HOME": str(home), "USER": user}
    join = [str(ENTER), "join", "--pid", str(pid), "--", "/bin/true"]
    bare_root = overlay_of_root(session, "bare")
    contenders = [
        Contender("fork-exec", ["/bin/true"]),
        Contender("bare", ["unshare", "--pid", "--fork", "--mount", "--mount-proc", "chroot",
                           str(bare_root), "/bin/true"]),
        Contender("sdeefs-join", join, user=user, env=user_env),
        Contender("sdeefs-shell", [str(SHELL), "-c", "/bin/true"], user=user, env=user_env),
        Contender("runuser-baseline", ["runuser", "-u", user, "--", "/bin/true"]),
        Contender("sdeefs-join+runuser", ["runuser", "-u", user, "--", *join]),
    ]
    if shutil.which("bwrap"):
        contenders.append(Contender("bwrap", ["bwrap", "--ro-bind", "/", "/", "--proc", "/proc",
                                              "--dev", "/dev", "--unshare-pid", "/bin/true"]))
    else:
        unavailable["bwrap"] = "bwrap not installed (apt-get install bubblewrap)"
    if shutil.which("ch-run"):
        # ch-run refuses "/" itself as an image (pivot_root EINVAL): use an overlay of /.
        image = overlay_of_root(session, "chrun")
        contenders.append(Contender("ch-run", ["ch-run", "--unset-env=*", str(image), "--",
                                               "/bin/true"], env={"USER": "root"}))
    else:
        unavailable["ch-run"] = "ch-run not installed (apt-get install charliecloud-runtime)"
    if shutil.which("podman"):
        rootfs = overlay_of_root(session, "podman")
        contenders.append(Contender(
            "podman", ["podman", "run", "--rm", "--network=none", "--ulimit", "nofile=1024:1024",
                       "--ulimit", "nproc=4096:4096", "--rootfs", str(rootfs), "/bin/true"],
            wrap=PODMAN_WRAP))
    else:
        unavailable["podman"] = "podman not installed"
    return contenders, unavailable


def measure(session: BenchSession, contenders: list[Contender], n: int,
            unavailable: dict[str, str]) -> list[Contender]:
    live: list[Contender] = []
    for contender in contenders:  # warm-up and availability check
        if run_batch(session, contender, 2) is None:
            unavailable[contender.name] = contender.error or "failed"
            log(f"{contender.name}: unavailable: {contender.error}")
        else:
            live.append(contender)
    rounds = max(1, n // BATCH)
    for r in range(rounds):
        order = live[r % len(live):] + live[: r % len(live)]  # rotate to spread drift
        for contender in order:
            if contender.error is not None:
                continue
            value = run_batch(session, contender, BATCH)
            if value is None:
                log(f"{contender.name}: failed: {contender.error}")
            else:
                contender.samples.append(value)
        log(f"round {r + 1}/{rounds}: " + ", ".join(
            f"{c.name} {c.samples[-1]:.2f}" for c in live if c.samples))
    return live


def cold_starts(site: object, user: str, count: int) -> tuple[list[float], list[float]]:
    starts: list[float] = []
    totals: list[float] = []
    for _ in range(count):
        t0 = time.perf_counter()
        site.start(user)  # type: ignore[attr-defined]
        t1 = time.perf_counter()
        site.stop(user)  # type: ignore[attr-defined]
        t2 = time.perf_counter()
        starts.append((t1 - t0) * 1e3)
        totals.append((t2 - t0) * 1e3)
    return starts, totals


STOP_REQUEST = ("import socket, sys; s = socket.socket(socket.AF_UNIX); s.connect(sys.argv[1]); "
                "s.sendall(b'{\"op\": \"stop\"}\\n'); s.recv(4096)")


def launchd_cold_starts(site: object, user: str, count: int) -> list[float]:
    """``sdeefs-shell -c /bin/true`` with no environment running: sdeefs-launchd starts one
    (guard + upper daemon, idmap, mask, namespaces), then the shell joins it and runs bash.
    Timed inside one runuser'd loop; the user's stop request between starts is not timed."""
    import subprocess

    run_dir = site.run_dir  # type: ignore[attr-defined]
    sock = run_dir / "launchd.sock"
    service = subprocess.Popen([str(ENTER.parent / "sdeefs-launchd")], env=site.env(),  # type: ignore[attr-defined]
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 30
        while not sock.exists():
            if time.monotonic() > deadline or service.poll() is not None:
                raise SystemExit("sdeefs-launchd did not start")
            time.sleep(0.05)
        script = (f"export SDEEFS_RUN_DIR={run_dir}; for i in $(seq {count}); do "
                  "t0=$(date +%s%N); " + f"{SHELL} -c /bin/true; " + "t1=$(date +%s%N); "
                  "echo $((t1 - t0)); "
                  f"/usr/bin/python3 -c {shlex.quote(STOP_REQUEST)} {sock}; done")
        out = subprocess.run(["runuser", "-u", user, "--", "sh", "-c", script],
                             capture_output=True, text=True, timeout=600, check=True).stdout
        return [int(line) / 1e6 for line in out.split()]
    finally:
        service.terminate()
        service.wait(timeout=10)


def fmt(ms: float) -> str:
    return f"{ms:.2f}" if ms < 100 else f"{ms:.0f}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=100, help="starts per contender (default 100)")
    parser.add_argument("--cold", type=int, default=10, help="cold starts (default 10)")
    parser.add_argument("--out", type=Path, help="write a Markdown report here")
    args = parser.parse_args()
    require_root()
    if not ENTER.exists() or not SHELL.exists():
        raise SystemExit(f"{ENTER} / {SHELL} missing (run scripts/setup.sh)")
    from tests.launcher.launcher_site import open_site

    host = HostInfo.collect()
    with BenchSession("sdeefs-startup-") as session, open_site() as site:
        user = site.add_user()
        pid = site.start(user)
        site.run(user, "/bin/true")
        contenders, unavailable = build_contenders(session, user, pid, site.run_dir,
                                                   site.home(user))
        live = measure(session, contenders, args.n, unavailable)
        site.stop(user)
        log(f"cold starts x{args.cold}")
        cold_start, cold_total = cold_starts(site, user, args.cold)
        log(f"cold starts through sdeefs-launchd x{args.cold}")
        service_cold = launchd_cold_starts(site, user, args.cold)

    medians = {c.name: statistics.median(c.samples) for c in live if c.samples}
    bare = medians.get("bare")
    header = ["contender", "ms per start (median)", "x bare", "min..max batch", "command"]
    rows: list[list[str]] = []
    for c in contenders:
        if c.name in medians:
            m = medians[c.name]
            rows.append([c.name, fmt(m), f"{m / bare:.2f}" if bare else "-",
                         f"{fmt(min(c.samples))}..{fmt(max(c.samples))}", c.shown()])
        else:
            rows.append([c.name, "unavailable", "-", "-", unavailable.get(c.name, c.error or "")])
    for name, reason in unavailable.items():
        if name not in {c.name for c in contenders}:
            rows.append([name, "unavailable", "-", "-", reason])
    if "sdeefs-join+runuser" in medians and "runuser-baseline" in medians:
        d = medians["sdeefs-join+runuser"] - medians["runuser-baseline"]
        rows.append(["sdeefs-join (+runuser minus runuser-baseline)", fmt(d),
                     f"{d / bare:.2f}" if bare else "-", "-", "derived"])
    cs, ct = statistics.median(cold_start), statistics.median(cold_total)
    rows.append(["sdeefs-cold: start", fmt(cs), f"{cs / bare:.0f}" if bare else "-",
                 f"{fmt(min(cold_start))}..{fmt(max(cold_start))}",
                 f"sdeefs start U (x{args.cold}, python CLI included)"])
    rows.append(["sdeefs-cold: start+stop", fmt(ct), f"{ct / bare:.0f}" if bare else "-",
                 f"{fmt(min(cold_total))}..{fmt(max(cold_total))}",
                 f"sdeefs start U + sdeefs stop U (x{args.cold})"])
    sc = statistics.median(service_cold)
    rows.append(["sdeefs-cold: sdeefs-shell via launchd", fmt(sc), f"{sc / bare:.0f}" if bare
                 else "-", f"{fmt(min(service_cold))}..{fmt(max(service_cold))}",
                 f"sdeefs-shell -c /bin/true, no environment running: sdeefs-launchd starts it "
                 f"(x{args.cold})"])

    print(render_text_table(header, rows))
    if args.out is not None:
        text = "\n".join([
            "# sdeefs start-up benchmark (/bin/true)",
            "",
            f"- command: `{host.command}`",
            f"- date: {host.date}",
            f"- host: {host.kernel}, {host.cpus} CPUs, Python {host.python}",
            f"- {args.n} starts per contender in batches of {BATCH}, interleaved round-robin; "
            "median batch, ms per start; x bare = ratio to the bare mechanism.",
            "- user contenders run the whole batch inside one `runuser`'d `sh` loop, so "
            "runuser is not counted; `+runuser` rows start runuser each time.",
            "- cold start (full: FUSE daemon + idmap + mask + namespaces) is timed separately "
            f"(x{args.cold}) and includes the `python -m sdeefs` CLI start.",
            "",
            render_markdown_table(header, rows),
            "",
        ])
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)
        log(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except MountError as exc:
        raise SystemExit(f"mount failed: {exc}") from None
