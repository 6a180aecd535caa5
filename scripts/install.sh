#!/usr/bin/env bash
# The system install of sdeefs, for admins (as root, on every login and compute node):
#
#   scripts/install.sh              install or update the runtime (idempotent)
#   scripts/install.sh --uninstall  remove exactly what it installed
#
# What it installs (docs/admin.md says what each piece is for):
#   PREFIX (/opt/sdeefs)        a Python venv with sdeefs (not editable: a copy of this tree),
#                               the C helpers bin/sdeefs-enter, bin/sdeefs-shell,
#                               bin/sdeefs-prolog, bin/sdeefs-epilog (links to sdeefs-enter),
#                               bin/sdeefs-guard (the guard layer's daemon),
#                               bin/sdeefs-bpfguard (the BPF LSM guard; optional: built
#                               if clang, bpftool, libbpf-dev install and it compiles), and
#                               lib/sdeefs/sdeefs_spank.so, the SLURM SPANK plugin (SLURM loads
#                               it once `sdeefs install-slurm` wrote the plugstack line)
#   BIN_DIR (/usr/local/bin)    sdeefs, sdeefs-shell, sdeefs-run: what users run
#   SBIN_DIR (/usr/local/sbin)  sdeefs-replicad, sdeefs-launchd, sdeefs-pam, sdeefs-prolog,
#                               sdeefs-epilog: what root, PAM and slurmd run
#   /etc/shells                 BIN_DIR/sdeefs-shell (chsh and sshd check it)
#   UNIT_DIR (/etc/systemd/system)  sdeefs-launchd.service, sdeefs-replicad@.service
#                               (@login, @compute), sdeefs-stop-idle and sdeefs-scan-private
#                               (.service + .timer); none is enabled: docs/admin.md does that
# Everything is readable and executable by every user (the login shell runs as the user),
# writable by root only.  Nothing under /etc/sdeefs or the users' data is touched, also not
# by --uninstall.
#
# Options: --prefix DIR --bin-dir DIR --sbin-dir DIR --unit-dir DIR (defaults above);
# --no-system-files leaves /etc/shells and the units alone (a second install beside the
# site's one, e.g. the test suite's).
set -euo pipefail
SRC="$(cd "$(dirname "$0")/.." && pwd)"

PREFIX=/opt/sdeefs BIN_DIR=/usr/local/bin SBIN_DIR=/usr/local/sbin UNIT_DIR=/etc/systemd/system
SYSTEM_FILES=1 UNINSTALL=0
while [ $# -gt 0 ]; do
  case "$1" in
    --prefix) PREFIX="$2"; shift 2 ;;
    --bin-dir) BIN_DIR="$2"; shift 2 ;;
    --sbin-dir) SBIN_DIR="$2"; shift 2 ;;
    --unit-dir) UNIT_DIR="$2"; shift 2 ;;
    --no-system-files) SYSTEM_FILES=0; shift ;;
    --uninstall) UNINSTALL=1; shift ;;
    -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) echo "install.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
  esac
done
[ "$(id -u)" = 0 ] || { echo "install.sh: run as root" >&2; exit 2; }
for dir in "$PREFIX" "$BIN_DIR" "$SBIN_DIR" "$UNIT_DIR"; do
  case "$dir" in /*) ;; *) echo "install.sh: $dir is not an absolute path" >&2; exit 2 ;; esac
done

USER_COMMANDS=(sdeefs sdeefs-shell sdeefs-run)
ROOT_COMMANDS=(sdeefs-replicad sdeefs-launchd sdeefs-pam sdeefs-prolog sdeefs-epilog)
UNITS=(sdeefs-launchd.service sdeefs-replicad@.service sdeefs-stop-idle.service
       sdeefs-stop-idle.timer sdeefs-scan-private.service sdeefs-scan-private.timer)
SHELLS_LINE="$BIN_DIR/sdeefs-shell"

systemd_running() { [ -d /run/systemd/system ]; }

# A link of ours: a symlink into PREFIX (someone else's file of that name stays).
remove_link() {
  local link="$1"
  if [ -L "$link" ] && [[ "$(readlink "$link")" == "$PREFIX/"* ]]; then rm -f "$link"; fi
}

if [ "$UNINSTALL" = 1 ]; then
  # The BPF guard's pinned set outlives every process (docs/admin.md): unpinned here unless
  # it still guards a running environment (then it stays, and the command says whose).
  if [ "$SYSTEM_FILES" = 1 ] && [ -x "$PREFIX/bin/sdeefs" ]; then
    "$PREFIX/bin/sdeefs" unload-guard | grep -v '^no BPF guard is loaded$' || true
  fi
  for name in "${USER_COMMANDS[@]}"; do remove_link "$BIN_DIR/$name"; done
  for name in "${ROOT_COMMANDS[@]}"; do remove_link "$SBIN_DIR/$name"; done
  if [ "$SYSTEM_FILES" = 1 ]; then
    for unit in "${UNITS[@]}"; do
      [ -f "$UNIT_DIR/$unit" ] && grep -q '^# installed by sdeefs' "$UNIT_DIR/$unit" || continue
      if systemd_running && [[ "$unit" != *@.service ]]; then
        systemctl disable --now "$unit" >/dev/null 2>&1 || true
      fi
      rm -f "$UNIT_DIR/$unit"
    done
    systemd_running && systemctl daemon-reload || true
    if [ -f /etc/shells ] && grep -qxF "$SHELLS_LINE" /etc/shells; then
      grep -vxF "$SHELLS_LINE" /etc/shells > /etc/shells.sdeefs-new || true
      chmod 644 /etc/shells.sdeefs-new && mv /etc/shells.sdeefs-new /etc/shells
    fi
  fi
  [ -f "$PREFIX/.sdeefs-install" ] && rm -rf --one-file-system "$PREFIX"
  echo "sdeefs: uninstalled from $PREFIX (configuration in /etc/sdeefs and users' data kept)"
  exit 0
fi

. "$SRC/scripts/apt.sh"
apt_install "${RUNTIME_PACKAGES[@]}"

# The source's fingerprint: an unchanged tree is not installed again.
fingerprint() {
  (cd "$SRC" && find pyproject.toml setup.py sdeefs launcher third_party -type f \
      \( -name '*.py' -o -name '*.c' -o -name '*.h' -o -name Makefile -o -name '*.toml' \
         -o -name '*.service' -o -name '*.timer' -o -name '*.patch' -o -name '*.sh' \
         -o -name '*.pyi' \) \
         -print0 | sort -z | xargs -0 sha256sum
   find docs README.md -name '*.md' -print0 | sort -z | xargs -0 sha256sum) |
    sha256sum | cut -d' ' -f1
}
WANT="$(fingerprint) $PREFIX"
umask 022
if [ ! -f "$PREFIX/.sdeefs-install" ] || [ "$(cat "$PREFIX/.sdeefs-install")" != "$WANT" ] ||
   ! (cd / && "$PREFIX/bin/python" -c 'import sdeefs.launcher, pyfuse3') 2>/dev/null; then
  echo "sdeefs: installing into $PREFIX" >&2
  [ -x "$PREFIX/bin/python" ] || /usr/bin/python3 -m venv "$PREFIX"
  "$PREFIX/bin/pip" install -q --disable-pip-version-check --upgrade pip >/dev/null
  # A copy, not a link to this checkout: the runtime must not depend on where (or whether)
  # the source stays, nor on its owner's home directory being searchable.
  BUILD="$(mktemp -d)"
  trap 'rm -rf "$BUILD"' EXIT
  (cd "$SRC" && tar --exclude=__pycache__ --exclude='*.so' -cf - pyproject.toml setup.py \
      README.md sdeefs launcher) |
    tar -xf - -C "$BUILD"
  "$PREFIX/bin/pip" install -q --disable-pip-version-check --no-warn-script-location \
    --force-reinstall --no-deps "$BUILD" >/dev/null
  "$PREFIX/bin/pip" install -q --disable-pip-version-check "$BUILD" >/dev/null
  # pyfuse3 with the sdeefs patch (third_party/pyfuse3/README.md: fallocate in views)
  if ! "$SRC/third_party/pyfuse3/build.sh" "$PREFIX" >"$BUILD/pyfuse3-build.log" 2>&1; then
    echo "sdeefs: building the patched pyfuse3 failed; keeping the stock one (fallocate in" \
         "views answers EOPNOTSUPP):" >&2
    tail -3 "$BUILD/pyfuse3-build.log" >&2
  fi
  # the capture's hot path in C is optional (the Python path gives the same journal) but
  # the kernel engine's small-file speed depends on it (issue 16): say so if it is missing
  if ! (cd / && "$PREFIX/bin/python" -c 'import sdeefs.fs._capturec') 2>/dev/null; then
    echo "sdeefs: warning: sdeefs.fs._capturec was not built (python3-dev, gcc?): the" \
         "kernel engine's capture uses its slower Python path" >&2
  fi
  # a replica's common records in C (a cold stream's CPU, issue 16): optional as well
  if ! (cd / && "$PREFIX/bin/python" -c 'import sdeefs.replication._applyc') 2>/dev/null; then
    echo "sdeefs: warning: sdeefs.replication._applyc was not built (python3-dev, gcc?):" \
         "replicas apply records with their slower Python path" >&2
  fi
  make -s -C "$BUILD/launcher/enter" OUT="$PREFIX/bin/sdeefs-enter"
  ln -sf sdeefs-enter "$PREFIX/bin/sdeefs-shell"
  # SLURM's Prolog/Epilog: the same binary, a client of the node's replicad (jobhook.c)
  ln -sf sdeefs-enter "$PREFIX/bin/sdeefs-prolog"
  ln -sf sdeefs-enter "$PREFIX/bin/sdeefs-epilog"
  make -s -C "$BUILD/sdeefs/fs/guardd" OUT="$PREFIX/bin/sdeefs-guard"
  # the BPF LSM guard: optional (guard = "auto" falls back to the layer; sdeefs doctor says so)
  if ! { apt_install "${BPF_BUILD_PACKAGES[@]}" &&
         make -s -C "$BUILD/launcher/login/bpf" OUT="$PREFIX/bin/sdeefs-bpfguard" \
           BUILD="$BUILD/bpfguard"; } >"$PREFIX/bpfguard-build.log" 2>&1; then
    rm -f "$PREFIX/bin/sdeefs-bpfguard"
    echo "sdeefs: warning: the BPF guard was not built (see $PREFIX/bpfguard-build.log): logins" \
         "use the guard layer; sdeefs doctor says what is missing" >&2
  fi
  # The SPANK plugin; `sdeefs install-slurm` names it in SLURM's plugstack (docs/admin.md)
  mkdir -p "$PREFIX/lib/sdeefs"
  make -s -C "$BUILD/launcher/enter" spank SPANK_OUT="$PREFIX/lib/sdeefs/sdeefs_spank.so"
  mkdir -p "$PREFIX/share/doc/sdeefs"
  cp "$SRC/README.md" "$SRC"/docs/*.md "$PREFIX/share/doc/sdeefs/"
  chmod -R go-w "$PREFIX"
  echo "$WANT" > "$PREFIX/.sdeefs-install"
fi

mkdir -p "$BIN_DIR" "$SBIN_DIR"
link() {  # link DIR NAME: DIR/NAME -> PREFIX/bin/NAME, if it exists there
  local dir="$1" name="$2"
  [ -e "$PREFIX/bin/$name" ] || return 0
  if [ -e "$dir/$name" ] && ! [ -L "$dir/$name" ]; then
    echo "install.sh: $dir/$name exists and is not a link: left alone" >&2
    return 0
  fi
  ln -sfn "$PREFIX/bin/$name" "$dir/$name"
}
for name in "${USER_COMMANDS[@]}"; do link "$BIN_DIR" "$name"; done
for name in "${ROOT_COMMANDS[@]}"; do link "$SBIN_DIR" "$name"; done

if [ "$SYSTEM_FILES" = 1 ]; then
  grep -qxF "$SHELLS_LINE" /etc/shells 2>/dev/null || echo "$SHELLS_LINE" >> /etc/shells
  mkdir -p "$UNIT_DIR"
  for unit in "${UNITS[@]}"; do
    sed -e "s|@SBIN_DIR@|$SBIN_DIR|g; s|@BIN_DIR@|$BIN_DIR|g; s|@PREFIX@|$PREFIX|g" \
      "$SRC/launcher/systemd/$unit" > "$UNIT_DIR/$unit.sdeefs-new"
    chmod 644 "$UNIT_DIR/$unit.sdeefs-new"
    mv "$UNIT_DIR/$unit.sdeefs-new" "$UNIT_DIR/$unit"
  done
  systemd_running && systemctl daemon-reload || true
fi
echo "sdeefs: installed in $PREFIX; commands in $BIN_DIR and $SBIN_DIR" \
     "(next steps: docs/admin.md)"
