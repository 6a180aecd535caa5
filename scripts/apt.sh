# Sourced by scripts/setup.sh and scripts/install.sh: apt_install PKG... installs the Debian
# packages that are missing (quietly; retries the lists update, which does not wait for a lock).
apt_install() {
  local missing=() pkg attempt
  for pkg in "$@"; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
  done
  [ ${#missing[@]} -eq 0 ] && return 0
  echo "sdeefs: installing ${missing[*]}" >&2
  for attempt in 1 2 3 4 5 6; do
    apt-get update -qq && break
    sleep 5
  done
  # No service of these packages starts on its own (the tests start their own sshd, munged,
  # slurmd with their own configs): a policy-rc.d for the time of the install, if none is there.
  local policy=""
  if [ ! -e /usr/sbin/policy-rc.d ]; then
    policy=/usr/sbin/policy-rc.d
    printf '#!/bin/sh\nexit 101\n' > "$policy" && chmod 755 "$policy"
  fi
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq -o DPkg::Lock::Timeout=600 \
    "${missing[@]}" >/dev/null || { [ -z "$policy" ] || rm -f "$policy"; return 1; }
  [ -z "$policy" ] || rm -f "$policy"
}

# The packages the runtime needs on every node (login and compute).
RUNTIME_PACKAGES=(
  fuse3 libfuse3-dev pkg-config             # FUSE, and what pyfuse3 builds against
  python3 python3-venv python3-dev gcc make # Debian's Python 3.11; gcc/make: the C helpers
  attr util-linux iproute2 procps e2fsprogs # xattr tools, mount/unshare, ip, ps, mkfs.ext4
  uidmap                                    # /etc/subuid handling (newuidmap, getsubids)
  patch                                     # the sdeefs patch of pyfuse3 (third_party/)
  libslurm-dev                              # slurm/spank.h: the SPANK plugin (sdeefs_spank.so)
  libbpf1                                   # the BPF guard's loader and map calls (login nodes)
  libssl-dev                                # openssl/evp.h: a replica checks frame MACs in C (_gmacc)
)

# What builds the BPF LSM guard (launcher/login/bpf: sdeefs-bpfguard).  Optional: without
# them, or if the build fails, logins use the guard layer (guard = "auto"; sdeefs doctor).
BPF_BUILD_PACKAGES=(clang libbpf-dev bpftool)
