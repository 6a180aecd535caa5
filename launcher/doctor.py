"""``sdeefs doctor``: does this node have what docs/admin.md asks for?  One line per check.

Each check looks at the real thing (the kernel, the files, the daemons through their
sockets), never at what an install script claims, and names the fix.  Roles: ``login``
(environments: PAM hook, launchd, the origin replicad) and ``compute`` (replicas: the
replicad, the SLURM prolog/epilog, where replicas and job layers live); checks both roles
need run in either.  A ``fail`` makes the exit code 1; a ``warn`` is something that works
but costs the site (a replica directory on ``/``, no time sync).
"""

from __future__ import annotations

import enum
import glob
import os
import pwd
import shutil
import subprocess
import tempfile
from collections.abc import Callable, Iterator

import attrs

from sdeefs import config as config_mod
from sdeefs import control, identity
from sdeefs.config import Guard, SiteConfig
from sdeefs.errors import QuietError
from sdeefs.fs.guard import guard_binary
from sdeefs.replication.daemon import load_key

from . import enter, view
from .compute import job
from .layout import SiteRun
from .login import bpfguard, pam


class Verdict(enum.StrEnum):
    OK = "ok"
    WARN = "warn"
    FAIL = "fail"


@attrs.frozen
class Finding:
    check: str
    verdict: Verdict
    detail: str
    fix: str = ""

    def line(self) -> str:
        fix = f" -> {self.fix}" if self.fix and self.verdict != Verdict.OK else ""
        return f"{self.verdict.value:<4} {self.check}: {self.detail}{fix}"


def ok(check: str, detail: str) -> Finding:
    return Finding(check, Verdict.OK, detail)


def default_role() -> str:
    """login where a PAM service runs the sdeefs hook, compute elsewhere."""
    return "login" if any(map(_has_marker, glob.glob(os.path.join(pam.PAM_DIR, "*")))) \
        else "compute"


def run_checks(role: str, config_path: str | None = None) -> list[Finding]:
    """Every check of ``role``, in the order docs/admin.md sets them up."""
    path = config_path or os.environ.get("SDEEFS_CONFIG") or config_mod.DEFAULT_PATH
    try:
        cfg = config_mod.load(config_path)
    except QuietError as exc:
        return [Finding("config", Verdict.FAIL, str(exc), f"fix {path} (docs/admin.md)")]
    found = [ok("config", path if os.path.exists(path) else f"{path} absent: all defaults")]
    checks: list[Callable[[SiteConfig], Iterator[Finding]]] = [_kernel, _install, _key, _munge,
                                                                _time_sync]
    checks += [_login_node] if role == "login" else [_compute_node]
    checks.append(lambda cfg: subids(cfg, role))
    for check in checks:
        try:
            found.extend(check(cfg))
        except OSError as exc:  # a check that cannot even look is a finding, not a crash
            found.append(Finding(check.__name__.strip("_"), Verdict.FAIL, str(exc)))
    return found


def _kernel(cfg: SiteConfig) -> Iterator[Finding]:
    with open("/proc/filesystems") as f:
        filesystems = f.read().split()
    yield (ok("fuse", "/dev/fuse") if os.path.exists("/dev/fuse") and "fuse" in filesystems
           else Finding("fuse", Verdict.FAIL, "no /dev/fuse", "modprobe fuse"))
    yield (ok("overlayfs", "in the kernel") if "overlay" in filesystems
           else Finding("overlayfs", Verdict.FAIL, "not in /proc/filesystems",
                        "modprobe overlay (kernel >= 5.19 for overlay over idmapped layers)"))
    with open("/proc/sys/user/max_user_namespaces") as f:
        userns = int(f.read())
    yield (ok("user namespaces", f"max_user_namespaces = {userns}") if userns > 0 else
           Finding("user namespaces", Verdict.FAIL, "max_user_namespaces = 0",
                   "sysctl -w user.max_user_namespaces=65536 (and in /etc/sysctl.d)"))
    yield _idmapped_mount(cfg)


def _idmapped_mount(cfg: SiteConfig) -> Finding:
    """Mount what every environment mounts: an idmapped read-only bind of the lower."""
    try:
        enter.helper_path()
    except QuietError as exc:
        return Finding("idmapped mounts", Verdict.FAIL, str(exc), "scripts/install.sh")
    target = tempfile.mkdtemp(prefix="sdeefs-doctor-")
    try:
        enter.run(["idmap", "--uid", "65534", "--gid", "65534", cfg.lower, target])
        view.detach(target)
        return ok("idmapped mounts", f"idmapped bind of {cfg.lower} works")
    except QuietError as exc:
        return Finding("idmapped mounts", Verdict.FAIL, str(exc),
                       "a kernel >= 5.19 whose filesystem of the lower supports idmapped mounts")
    finally:
        os.rmdir(target)


def subids(cfg: SiteConfig, role: str, subuid: str = identity.SUBUID,
           subgid: str = identity.SUBGID) -> Iterator[Finding]:
    """Every user who may have an environment has subordinate ranges here (docs/identity.md).
    The login node allocates missing ones at login (warn); a compute node never does, and
    its replicas refuse those users' subordinate ids (fail).  That they are the same on
    every node, no node can tell alone: distribute the files."""
    missing = [pw.pw_name for pw in pwd.getpwall()
               if cfg.min_uid <= pw.pw_uid < 65534 and not all(
                   identity.lookup_range(path, pw.pw_name, pw.pw_uid) for path in (subuid, subgid))]
    if not missing:
        yield ok("subordinate ids", f"every user from uid {cfg.min_uid} has ranges in {subuid}, "
                 f"{subgid} (they must be the same on every node)")
        return
    names = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
    yield Finding("subordinate ids", Verdict.WARN if role == "login" else Verdict.FAIL,
                  f"no range of 65536 ids in {subuid} or {subgid} for {names}",
                  "copy the login node's /etc/subuid and /etc/subgid here" if role != "login"
                  else "usermod --add-subuids/--add-subgids, or let the first login allocate")


def _install(cfg: SiteConfig) -> Iterator[Finding]:
    try:
        yield ok("sdeefs-enter", enter.helper_path())
    except QuietError as exc:
        yield Finding("sdeefs-enter", Verdict.FAIL, str(exc), "scripts/install.sh")
    if cfg.guard in (Guard.C, Guard.AUTO):  # the guard layer's daemon (login views)
        guard = guard_binary()
        yield (ok("sdeefs-guard", guard) if os.access(guard, os.X_OK) else
               Finding("sdeefs-guard", Verdict.FAIL, f"{guard} is missing: logins cannot start "
                       "their guard layer", 'scripts/install.sh (or guard = "python")'))
    yield from _guard(cfg)
    for command in ("sdeefs", "sdeefs-run"):
        where = shutil.which(command, path="/usr/local/bin:/usr/bin:/bin")
        yield (ok(f"{command} on PATH", where) if where else
               Finding(f"{command} on PATH", Verdict.FAIL, "not in /usr/local/bin or /usr/bin",
                       "scripts/install.sh"))


def _guard(cfg: SiteConfig) -> Iterator[Finding]:
    """Which guard logins get and why (launcher/login/bpfguard.py: choose)."""
    try:
        choice = bpfguard.choose(cfg, cfg.engine)
    except bpfguard.GuardUnavailable as exc:
        yield Finding("login guard", Verdict.FAIL, f"{exc}: every login fails",
                      BPF_FIXES[exc.blocked.blocker] + ' (or guard = "auto": the guard layer '
                      "where bpf cannot run)")
        return
    detail = f"{choice.guard or 'none'}: {choice.why}"
    if choice.blocked is not None:
        # works, but every first walk's metadata pays the FUSE layer (issue 16)
        yield Finding("login guard", Verdict.WARN, detail, BPF_FIXES[choice.blocked.blocker])
        return
    yield ok("login guard", detail)


BPF_FIXES = {  # what gets the BPF guard running
    bpfguard.Blocker.NOT_BUILT: "apt-get install clang libbpf-dev bpftool libbpf1, then "
                                "scripts/install.sh (it builds sdeefs-bpfguard)",
    bpfguard.Blocker.DENY: "write each deny pattern as a path or with one * in its last "
                           "component",
    bpfguard.Blocker.ENGINE: 'engine = "kernel"',
    bpfguard.Blocker.GROUPS: "fewer groups for that user",
    bpfguard.Blocker.KERNEL: "a kernel with BPF LSM active (CONFIG_BPF_LSM=y, bpf in the lsm= "
                             "list: Debian 12's own kernels) that allows BPF trampolines",
}


def _key(cfg: SiteConfig) -> Iterator[Finding]:
    rep = cfg.replication
    key_file = rep.key_file
    if rep.auth == "munge" or (rep.auth == "auto" and not os.path.exists(key_file)):
        yield ok("replication auth", f"MUNGE (munged at {rep.munge_socket}; no key file)")
        return
    try:
        load_key(key_file)
        yield ok("replication key", key_file)
    except QuietError as exc:
        yield Finding("replication key", Verdict.FAIL, str(exc),
                      f"the same >= 32-byte key on every node, root 0600: "
                      f"(umask 077; head -c 48 /dev/urandom | base64 > {key_file}); "
                      f"or replication.auth = \"munge\" (no key)")


def _munge(cfg: SiteConfig) -> Iterator[Finding]:
    if shutil.which("munge") is None:
        yield Finding("munge", Verdict.WARN, "munge is not installed",
                      "apt-get install munge (SLURM needs it; so do SLURM commands inside)")
        return
    sock = f"--socket={cfg.replication.munge_socket}"
    probe = subprocess.run(["munge", "-n", sock], capture_output=True, timeout=10)
    if probe.returncode == 0:
        probe = subprocess.run(["unmunge", sock], input=probe.stdout, capture_output=True,
                               timeout=10)
    error = probe.stderr.decode(errors="replace").strip().splitlines() or ["failed"]
    yield (ok("munge", "a credential round trip works") if probe.returncode == 0 else
           Finding("munge", Verdict.FAIL, error[-1],
                   "systemctl enable --now munge (the same /etc/munge/munge.key everywhere)"))


def _time_sync(cfg: SiteConfig) -> Iterator[Finding]:
    if shutil.which("timedatectl") and os.path.isdir("/run/systemd/system"):
        out = subprocess.run(["timedatectl", "show", "-p", "NTPSynchronized", "--value"],
                             capture_output=True, text=True, timeout=10).stdout.strip()
        if out == "yes":
            yield ok("time sync", "NTP synchronized")
            return
    for daemon in ("chronyd", "ntpd", "systemd-timesyncd", "ntpsec"):
        if subprocess.run(["pgrep", "-x", daemon], capture_output=True).returncode == 0:
            yield ok("time sync", f"{daemon} runs")
            return
    yield Finding("time sync", Verdict.WARN, "no NTP daemon found",
                  "apt-get install chrony (munge credentials expire: clocks must agree)")


def _replicad(cfg: SiteConfig, role: str) -> Iterator[Finding]:
    rep = cfg.replication.on(job.node_name())
    unit = f"sdeefs-replicad@{role}"
    try:
        reply = control.request(rep.control, {"op": "status"}, timeout=5, what="sdeefs-replicad")
    except QuietError as exc:
        yield Finding("replicad", Verdict.FAIL, str(exc), f"systemctl enable --now {unit}")
        return
    serving = "origin" in reply if role == "login" else "replicas" in reply
    yield (ok("replicad", f"answers on {rep.control} as {role}") if serving else
           Finding("replicad", Verdict.FAIL, f"answers on {rep.control}, but not as {role}",
                   f"run it as {unit}"))


def _login_node(cfg: SiteConfig) -> Iterator[Finding]:
    services = [os.path.basename(p) for p in glob.glob(os.path.join(pam.PAM_DIR, "*"))
                if _has_marker(p)]
    yield (ok("PAM hook", f"in {', '.join(sorted(services))}") if services else
           Finding("PAM hook", Verdict.FAIL, "no PAM service runs sdeefs-pam",
                   "sdeefs install-pam --service sshd (and login, su ... as wanted)"))
    shell = shutil.which("sdeefs-shell", path="/usr/local/bin:/usr/bin")
    with open("/etc/shells") as f:
        listed = shell is not None and shell in f.read().split()
    yield (ok("login shell", f"{shell} in /etc/shells") if listed else
           Finding("login shell", Verdict.FAIL, "sdeefs-shell missing from /etc/shells",
                   "scripts/install.sh"))
    socket_path = SiteRun(cfg.run_dir).launchd_socket
    try:
        control.request(socket_path, {"op": "ping"}, timeout=5, what="sdeefs-launchd")
        yield ok("launchd", socket_path)
    except control.ControlError:
        yield ok("launchd", socket_path)  # it answered (a refusal of the probe is an answer)
    except QuietError as exc:
        yield Finding("launchd", Verdict.FAIL, str(exc),
                      "systemctl enable --now sdeefs-launchd (logins that skip PAM need it)")
    yield from _not_on_root("layers", cfg.root)
    yield _engine(cfg)
    if not cfg.replication.login:
        yield Finding("replication", Verdict.FAIL, "replication.login is not set",
                      "set [replication] login = \"THIS-HOST:PORT\" in the config")
    else:
        yield from _replicad(cfg, "login")


def _engine(cfg: SiteConfig) -> Finding:
    """The hybrid engine gives ESTALE after one name of a hard-linked file is removed
    (docs/hardlinks.md: the kernel's, no fix in the daemon): new environments must not
    get it, and its users are pointed to ``sdeefs migrate``."""
    from . import env  # (env imports the launcher's other modules)

    users = sorted(n for n in os.listdir(cfg.root) if not n.startswith(".")) \
        if os.path.isdir(cfg.root) else []
    hybrid = [n for n in users if env.on_hybrid(cfg, n)]
    if cfg.engine == config_mod.Engine.HYBRID:
        return Finding("engine", Verdict.WARN, "new environments get the hybrid engine, whose "
                       "hard links can give ESTALE (docs/hardlinks.md)",
                       'engine = "kernel" in the config, then `sdeefs migrate USER` per user')
    if hybrid:
        shown = ", ".join(hybrid[:5]) + (f" and {len(hybrid) - 5} more" if len(hybrid) > 5
                                         else "")
        return Finding("engine", Verdict.WARN, f"{len(hybrid)} users stay on the hybrid engine "
                       f"until migrated ({shown}): hard links can give ESTALE there "
                       "(docs/hardlinks.md)", "sdeefs stop USER; sdeefs migrate USER")
    return ok("engine", f"{cfg.engine} for every environment")


def _compute_node(cfg: SiteConfig) -> Iterator[Finding]:
    rep = cfg.replication.on(job.node_name())
    if not rep.login:
        yield Finding("replication", Verdict.FAIL, "replication.login is not set",
                      "set [replication] login = \"LOGIN-HOST:PORT\" in the config")
    else:
        yield from _replicad(cfg, "compute")
    yield from _not_on_root("replicas", rep.replica_dir)
    yield from _not_on_root("job layers", rep.job_dir)
    yield from _slurm_hooks(cfg)


def plugstack_lines(path: str, depth: int = 0) -> list[str]:
    """The plugin lines of a SLURM plugstack.conf, its ``include`` globs followed."""
    try:
        with open(path) as f:
            text = f.read()
    except OSError:
        return []
    found = []
    for raw in text.splitlines():
        line = raw.split("#", 1)[0].strip()
        if line.startswith("include") and depth < 4:
            pattern = line.split(None, 1)[1] if len(line.split(None, 1)) > 1 else ""
            if not os.path.isabs(pattern):
                pattern = os.path.join(os.path.dirname(path), pattern)
            for included in sorted(glob.glob(pattern)):
                found += plugstack_lines(included, depth + 1)
        elif line:
            found.append(line)
    return found


def _plugstack(cfg: SiteConfig, config_path: str) -> Finding:
    """The SPANK plugin (jobs run in the environment with no wrapper) in SLURM's plugstack,
    for this site's job_dir."""
    fix = "sdeefs install-slurm, then restart slurmd (docs/admin.md)"
    want = job.plugstack_line(cfg)
    lines = [line for line in plugstack_lines(config_path) if "sdeefs_spank.so" in line]
    if not lines:
        return Finding("SLURM plugstack", Verdict.FAIL,
                       f"{config_path} does not load sdeefs_spank.so: jobs run bare", fix)
    if " ".join(lines[0].split()) != want:
        return Finding("SLURM plugstack", Verdict.FAIL,
                       f"{lines[0]!r} is not this installation's {want!r}", fix)
    if not os.path.isfile(job.spank_plugin()):
        return Finding("SLURM plugstack", Verdict.FAIL, f"{job.spank_plugin()} is missing",
                       "scripts/install.sh (it builds the plugin against libslurm-dev)")
    return ok("SLURM plugstack", want)


def _slurm_hooks(cfg: SiteConfig) -> Iterator[Finding]:
    if shutil.which("scontrol") is None:
        yield Finding("SLURM", Verdict.WARN, "scontrol not found", "install slurmd")
        return
    shown = subprocess.run(["scontrol", "show", "config"], capture_output=True, text=True,
                           timeout=20)
    if shown.returncode != 0:
        yield Finding("SLURM", Verdict.WARN, "scontrol show config failed",
                      "is slurmctld reachable from this node?")
        return
    settings = dict(line.split("=", 1) for line in shown.stdout.splitlines() if "=" in line)
    settings = {k.strip(): v.strip() for k, v in settings.items()}
    for key, want in (("Prolog", "prolog"), ("Epilog", "epilog")):
        value = settings.get(key, "")
        good = f"sdeefs-{want}" in value or "sdeefs job-" in value
        yield (ok(f"SLURM {key}", value) if good else
               Finding(f"SLURM {key}", Verdict.FAIL, f"{key} = {value or '(none)'}",
                       f"{key}=/usr/local/sbin/sdeefs-{want} in slurm.conf (docs/admin.md)"))
    flags = settings.get("PrologFlags", "")
    yield (ok("SLURM PrologFlags", flags) if "Alloc" in flags else
           Finding("SLURM PrologFlags", Verdict.FAIL, f"PrologFlags = {flags or '(none)'}",
                   "PrologFlags=Alloc in slurm.conf: the replica is ready before any step"))
    yield _plugstack(cfg, settings.get("PlugStackConfig") or "/etc/slurm/plugstack.conf")


def _has_marker(path: str) -> bool:
    try:
        with open(path) as f:
            return any(line.rstrip().endswith(pam.MARKER) for line in f)
    except OSError:
        return False


def _not_on_root(what: str, path: str) -> Iterator[Finding]:
    probe = path
    while not os.path.exists(probe):
        probe = os.path.dirname(probe)
    if os.stat(probe).st_dev == os.stat("/").st_dev and path != "/":
        yield Finding(what, Verdict.WARN, f"{path} is on the root filesystem",
                      "a filesystem of its own: users filling it must not fill /")
    else:
        yield ok(what, f"{path} is not on /")
