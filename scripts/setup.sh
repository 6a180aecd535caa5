#!/usr/bin/env bash
# Install what sdeefs needs on Debian 12 (idempotent; fast when everything is there).
# Runs as root: apt packages, then a virtualenv in .venv with sdeefs and its test tools.
set -euo pipefail
cd "$(dirname "$0")/.."

. scripts/apt.sh
DEV_PACKAGES=(
  fuse-overlayfs fio                  # benchmark peers and load generator
  pamtester openssh-server            # the launcher's PAM tests; a real sshd login (tests)
  apt-utils                           # apt-ftparchive: a local package repository (tests)
  python3-pip                         # pip into the system site-packages, inside (tests)
  munge slurmctld slurmd slurm-client # a real SLURM cluster for the replication tests
  rsync                               # deploy benchmark peer
  mpich libmpich-dev                  # MPI ranks started by srun, in the environment (tests)
)
apt_install "${RUNTIME_PACKAGES[@]}" "${DEV_PACKAGES[@]}"
apt_install "${BPF_BUILD_PACKAGES[@]}" || echo "setup: $(echo "${BPF_BUILD_PACKAGES[@]}") not" \
  "installed: no BPF guard (logins use the guard layer)" >&2

modprobe fuse 2>/dev/null || true
[ -e /dev/fuse ] || { echo "setup: /dev/fuse is missing and could not be loaded" >&2; exit 3; }

if [ ! -x .venv/bin/python ] || ! .venv/bin/python -c 'import pyfuse3, trio, attrs, xattr, blake3, pytest_trio, hypothesis' 2>/dev/null; then
  echo "setup: creating .venv" >&2
  /usr/bin/python3 -m venv .venv
  .venv/bin/pip install -q --upgrade pip >/dev/null
  .venv/bin/pip install -q -e '.[test]' >/dev/null
  touch .venv/.installed
elif [ pyproject.toml -nt .venv/.installed ] || [ setup.py -nt .venv/.installed ] ||
     [ sdeefs/fs/_capturec.c -nt .venv/.installed ] ||
     [ sdeefs/replication/_applyc.c -nt .venv/.installed ] ||
     [ sdeefs/replication/_gmacc.c -nt .venv/.installed ] ||
     ! .venv/bin/python -c 'import sdeefs, sdeefs.launcher' 2>/dev/null; then
  # A changed pyproject.toml may move an entry point (sdeefs-pam, sdeefs-run ...), and the
  # C extensions are built in place by the editable install: reinstall.
  .venv/bin/pip install -q -e '.[test]' >/dev/null
  touch .venv/.installed
fi

# pyfuse3 with the sdeefs patch (third_party/pyfuse3/README.md: fallocate); the stock build
# still serves everything else, so a failed build is a warning, not the end of set-up.
if ! third_party/pyfuse3/build.sh .venv >/tmp/sdeefs-pyfuse3-build.log 2>&1; then
  echo "setup: building the patched pyfuse3 failed (see /tmp/sdeefs-pyfuse3-build.log);" \
       "keeping the stock pyfuse3: fallocate in views answers EOPNOTSUPP" >&2
fi

# The launcher's namespace helper (C: it sits on every login's hot path); make rebuilds it
# when a source changed.
make -s -C launcher/enter OUT="$PWD/.venv/bin/sdeefs-enter"
ln -sf sdeefs-enter .venv/bin/sdeefs-shell   # the login shell: same binary, shell mode
# SLURM's Prolog/Epilog: same binary, a client of the node's replicad (launcher/enter/jobhook.c)
ln -sf sdeefs-enter .venv/bin/sdeefs-prolog
ln -sf sdeefs-enter .venv/bin/sdeefs-epilog
# The guard layer's daemon (C, libfuse3: every first lookup of a login view passes it).
make -s -C sdeefs/fs/guardd OUT="$PWD/.venv/bin/sdeefs-guard"
# The BPF LSM guard (launcher/login/bpf): optional, guard = "auto" falls back to the layer.
if ! make -s -C launcher/login/bpf OUT="$PWD/.venv/bin/sdeefs-bpfguard" \
     BUILD="$PWD/.venv/lib/sdeefs-bpfguard.build" >/tmp/sdeefs-bpfguard-build.log 2>&1; then
  rm -f .venv/bin/sdeefs-bpfguard
  echo "setup: building the BPF guard failed (see /tmp/sdeefs-bpfguard-build.log): logins" \
       "use the guard layer (sdeefs doctor)" >&2
fi
# The SLURM SPANK plugin (jobs run in the user's environment with no wrapper), beside the
# venv's lib as install.sh puts it beside PREFIX's: `sdeefs install-slurm` finds it there.
mkdir -p .venv/lib/sdeefs
make -s -C launcher/enter spank SPANK_OUT="$PWD/.venv/lib/sdeefs/sdeefs_spank.so"
