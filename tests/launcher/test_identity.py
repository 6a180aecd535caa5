"""The id map of docs/identity.md in a real environment: apt and dpkg out of the box, what
lands in the upper, the migration of an upper of the old one-id map, and the view's own
/run, /var/log, PATH and "/"."""

from __future__ import annotations

import hashlib
import os
import pwd
import subprocess
from pathlib import Path

import pytest

from sdeefs.identity import Identity, of_user

from .launcher_site import Site, open_site, requires_launcher

pytestmark = requires_launcher

PACKAGE = "sdt-hello"


def build_repo(where: Path) -> Path:
    """A flat apt repository (no network) holding one package whose postinst gives a
    directory to a system user (daemon, uid 1), as packages of services do."""
    pkg = where / "pkg"
    (pkg / "DEBIAN").mkdir(parents=True)
    (pkg / "usr/bin").mkdir(parents=True)
    (pkg / "DEBIAN/control").write_text(
        f"Package: {PACKAGE}\nVersion: 1.0\nArchitecture: all\nMaintainer: t <t@t>\n"
        "Description: sdeefs test package\n")
    (pkg / "DEBIAN/postinst").write_text(
        "#!/bin/sh\nset -e\nmkdir -p /var/lib/sdt-hello\nchown daemon:daemon /var/lib/sdt-hello\n")
    (pkg / "DEBIAN/postinst").chmod(0o755)
    (pkg / "usr/bin/sdt-hello").write_text("#!/bin/sh\necho hello from the package\n")
    (pkg / "usr/bin/sdt-hello").chmod(0o755)
    repo = where / "repo"
    repo.mkdir()
    deb = repo / f"{PACKAGE}_1.0_all.deb"
    subprocess.run(["dpkg-deb", "--root-owner-group", "--build", str(pkg), str(deb)], check=True,
                   capture_output=True)
    fields = subprocess.run(["dpkg-deb", "-f", str(deb)], check=True, capture_output=True,
                            text=True).stdout
    data = deb.read_bytes()
    (repo / "Packages").write_text(
        f"{fields.rstrip()}\nFilename: ./{deb.name}\nSize: {len(data)}\n"
        f"SHA256: {hashlib.sha256(data).hexdigest()}\n\n")
    for path in (where, repo, *repo.iterdir()):
        path.chmod(0o755 if path.is_dir() else 0o644)
    return repo


def apt_day(repo: Path) -> str:
    """What a user types: the site's sources replaced by the local repository, then apt."""
    return f"""set -e
        echo 'deb [trusted=yes] file:{repo} ./' > /etc/apt/sources.list
        rm -rf /etc/apt/sources.list.d/*
        apt-get update -q
        apt-get install -y -q {PACKAGE}
        sdt-hello
        stat -c 'owner=%U:%G' /var/lib/sdt-hello
        apt-get remove -y -q {PACKAGE}
        test ! -e /usr/bin/sdt-hello
        dpkg -i {repo}/{PACKAGE}_1.0_all.deb
        dpkg -s {PACKAGE} | grep '^Status:'
        test -s /var/log/apt/history.log && echo apt-logged
        ldconfig && echo ldconfig-found
    """


def walk_ids(top: Path) -> set[tuple[int, int]]:
    found = set()
    for dirpath, dirnames, filenames in os.walk(top):
        for name in dirnames + filenames:
            st = os.lstat(os.path.join(dirpath, name))
            if not (st.st_mode & 0o170000 == 0o020000 and st.st_rdev == 0):  # not whiteouts
                found.add((st.st_uid, st.st_gid))
    return found


def ids_of(user: str) -> Identity:
    return of_user(user, 1000, allocate=False)


@pytest.mark.parametrize("engine", ["hybrid", "fuse", "overlay"])
def test_apt_and_dpkg_work_out_of_the_box(engine: str) -> None:
    with open_site(engine) as site:
        repo = build_repo(site.base / "apt")
        user = site.add_user()
        site.start(user)
        out = site.run(user, apt_day(repo), timeout=300).stdout
        assert "hello from the package" in out
        assert "owner=daemon:daemon" in out  # a system id inside: mapped, and itself
        assert "Status: install ok installed" in out
        assert "apt-logged" in out
        assert "ldconfig-found" in out
        ids = ids_of(user)
        upper = site.upper(user)
        # what lands in the upper: inside root as S, daemon (1) as S+1; nothing foreign
        assert (upper / "usr/bin/sdt-hello").stat().st_uid == ids.subuid
        st = (upper / "var/lib/sdt-hello").stat()
        assert (st.st_uid, st.st_gid) == (ids.subuid + 1, ids.subgid + 1)
        assert all(ids.owns_uid(u) and ids.owns_gid(g) for u, g in walk_ids(upper))
        # the host's own /var/log stays hidden; the environment's is its own
        host_logs = set(os.listdir("/var/log"))
        inside = set(site.run(user, "ls /var/log").stdout.split())
        assert inside == {"apt", "dpkg.log"} or not (inside & host_logs - {"apt", "dpkg.log"})
        if engine != "overlay":  # the journal replays to the same upper, chowns included
            site.stop(user)
            state = site.root / user / "state"
            site.sdeefs("check", "--upper", str(upper), "--state", str(state))


def test_the_view_a_root_shell_expects() -> None:
    with open_site() as site:
        user = site.add_user()
        site.start(user)
        uid = site.uid(user)
        ids = ids_of(user)
        out = site.run(user, "id -u; id -un; cat /proc/self/uid_map; echo PATH=$PATH; "
                             "stat -c '%a %U' /; ls -la /run; stat -c %U /var/log").stdout
        lines = out.splitlines()
        assert lines[:2] == ["0", "root"]
        assert [line.split() for line in lines[2:5]] == [
            ["0", str(ids.subuid), str(uid)], [str(uid + 1), str(ids.subuid + uid + 1),
                                               str(65536 - uid - 1)], [str(uid)] * 2 + ["1"]]
        path = next(line for line in lines if line.startswith("PATH="))
        assert path.startswith("PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin")
        assert f"{os.stat('/').st_mode & 0o777:o} root" in lines
        assert "?" not in out  # no broken entry in /run (the whiteout of the host's run dir)
        assert lines[-1] == "root"
        # the user's own uid exists inside, and files of the home are theirs
        assert site.run(user, f"stat -c %U {site.home(user)}").stdout.strip() == user
        assert site.run(user, f"setpriv --reuid={uid} --regid={pwd.getpwnam(user).pw_gid} "
                              "--init-groups id -un").stdout.strip() == user


def test_an_upper_of_the_one_id_map_is_migrated() -> None:
    """Before this map every entry of an upper was made by inside root, as host u: at the
    first start, u's entries become S's (through the journal), and the layer is marked."""
    with open_site() as site:
        user = site.add_user()
        uid, gid = site.uid(user), pwd.getpwnam(user).pw_gid
        site.start(user)  # the layout, then an upper as the old map left it
        site.run(user, "mkdir -p /opt/old && echo old > /opt/old/file && chmod 1777 /opt/old")
        site.stop(user)
        upper = site.upper(user)
        marker = site.root / user / "state" / "idmap"
        marker.unlink()
        for path in (upper / "opt", upper / "opt/old", upper / "opt/old/file"):
            os.lchown(path, uid, gid)
        site.start(user)
        out = site.run(user, "stat -c '%U:%G' /opt/old /opt/old/file; cat /opt/old/file").stdout
        assert out.split() == ["root:root", "root:root", "old"]
        ids = ids_of(user)
        assert (upper / "opt/old/file").stat().st_uid == ids.subuid
        assert marker.read_text() == f"sdeefs-idmap 2 {ids.subuid} {ids.subgid}\n"
        site.stop(user)
        site.sdeefs("check", "--upper", str(upper), "--state", str(site.root / user / "state"))
        # ranges that changed since are refused, in one line
        marker.write_text("sdeefs-idmap 2 1 1\n")
        result = site.sdeefs("start", user, check=False)
        assert result.returncode != 0
        assert "subordinate ranges" in result.stderr
        assert len(result.stderr.splitlines()) == 1


def test_a_user_without_subordinate_ranges_gets_them(site: Site) -> None:
    user = site.add_user()
    for path in ("/etc/subuid", "/etc/subgid"):  # useradd allocated them: take them away
        text = Path(path).read_text()
        Path(path).write_text("".join(line + "\n" for line in text.splitlines()
                                      if not line.startswith(f"{user}:")))
    site.start(user)
    ids = ids_of(user)
    assert f"{user}:{ids.subuid}:65536" in Path("/etc/subuid").read_text()
    assert site.run(user, "cat /proc/self/uid_map").stdout.split()[:2] == ["0", str(ids.subuid)]
