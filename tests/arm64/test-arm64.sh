#!/usr/bin/env bash
# make test-arm64: the engine's tests on aarch64 under qemu-user emulation.
#
#   tests/arm64/test-arm64.sh [MORE PYTEST ARGS...]   (make test-arm64 PYTEST_ARGS=...)
#
# What it proves, and what it cannot: qemu-user runs the aarch64 code on this
# x86-64 CPU, under x86-64's memory ordering (TSO), so no weak-ordering bug can
# show up here. It shows that the compiled core builds with an aarch64 gcc, that
# the build emits acquire/release instructions (ldar/stlr), and that the engine's
# tests pass on aarch64 (where the pure-Python fallback must refuse to run).
#
# The steps, each bounded by a timeout:
#  1. Debian's qemu-user-static, mmdebstrap, binfmt-support, arch-test and zstd
#     on the host (apt-get, once).
#  2. A Debian bookworm arm64 root made by mmdebstrap, cached as a zstd tarball
#     keyed by its package list ($SHMCAST_ARM64_CACHE, default /var/tmp/shmcast-arm64).
#  3. A venv in the root with the project's requirements as PyPI aarch64 wheels
#     (Debian's python3 packages are older than the project's pins), cached too.
#  4. The root, unpacked afresh into a tmpfs; the source tree (git ls-files)
#     copied into it; `pip install` builds the core with the root's gcc; objdump
#     counts its acquire/release instructions; pytest runs the engine's tests
#     with SHMCAST_CORE=c.
#
# Nothing outlives a run, however it ends (even by SIGKILL): everything from
# step 2 on runs in new mount and PID namespaces (`unshare --kill-child` under
# `setpriv --pdeathsig KILL`), so the kernel takes every mount and process
# with them; the root itself lives in a tmpfs of that mount namespace. The
# qemu-aarch64 binfmt_misc handler is registered in a binfmt_misc instance of
# the run's own user namespace (Linux 6.7 and later), so the host's binfmt
# settings are never touched. On older kernels the host's handler is enabled for
# the run and put back as it was found at the end (a run killed by SIGKILL
# leaves a note that the next run uses to put it back).
#
# Needs root, Linux and an x86-64 host; elsewhere it says why and exits 0
# (skipped). Exit status: 0 passed or skipped, 1 failed.
set -euo pipefail

SCRIPT=$(realpath "${BASH_SOURCE[0]}")
SRC=$(cd "$(dirname "$SCRIPT")/../.." && pwd)
CACHE=${SHMCAST_ARM64_CACHE:-/var/tmp/shmcast-arm64}
SUITE=bookworm
MIRRORS=(
  "deb http://deb.debian.org/debian $SUITE main"
  "deb http://deb.debian.org/debian $SUITE-updates main"
  "deb http://deb.debian.org/debian-security $SUITE-security main"
)
HOST_PKGS=(qemu-user-static mmdebstrap binfmt-support arch-test zstd)
# In the root: Python and what builds the core (gcc, the C library's and
# Python's headers, objdump), venv for the PyPI wheels, and the commands the
# engine's tests run (mount for a private /dev/shm; ps). No ca-certificates: the
# host's bundle is copied in (its postinst alone takes minutes under emulation).
ROOT_PKGS=(python3 python3-dev python3-venv gcc libc6-dev binutils mount procps)
# The engine's tests: every test on both cores (the each_core fixture, marked
# `engine` by tests/conftest.py) and tests/test_core.py, in these files.
ENGINE_FILES=(tests/test_segment_api.py tests/test_segment_concurrency.py
  tests/test_segment_properties.py tests/test_segment_rules.py
  tests/test_trust_engine.py tests/test_core.py tests/test_faults.py)
# Requirements the engine's tests do not need (the linters of `make lint`).
NOT_IN_ROOT=(ruff mypy import-linter)
# Bounds of each step, in seconds.
T_APT=900 T_ROOT=2400 T_VENV=1200 T_INSTALL=900 T_PYTEST=2400 T_LOCK=3600

log() { printf '[arm64 %(%H:%M:%S)T] %s\n' -1 "$*" >&2; }
die() { # inside the namespaces: the host side reports the failure
  log "error: $*"
  exit 1
}
fail() {
  log "error: $*"
  echo "make test-arm64: FAILED: $* ($(elapsed $((SECONDS - ${STARTED:-0}))))"
  exit 1
}
skip() {
  echo "make test-arm64 skipped: $*"
  exit 0
}
elapsed() { printf '%dm%02ds' $(($1 / 60)) $(($1 % 60)); }

# ------------------------------------------------------------ inside the namespaces

# binfmt_misc instance of this user namespace: register qemu-aarch64 with the F
# flag (the kernel opens the interpreter now, so the chroot needs no copy of it).
private_binfmt() {
  mount -t binfmt_misc binfmt_misc /proc/sys/fs/binfmt_misc
  cat /usr/lib/binfmt.d/qemu-aarch64.conf >/proc/sys/fs/binfmt_misc/register
}

# The root's mounts, all private to this mount namespace.
mount_root() {
  local r=$1 n
  mount --bind "$r" "$r" # a mount point: `unshare --mount` works inside the chroot
  mount -t proc proc "$r/proc"
  # A new sysfs needs a network namespace of our own; bind the host's read-only.
  mount -t sysfs -o ro sysfs "$r/sys" 2>/dev/null || mount -o rbind,ro /sys "$r/sys"
  mount -t tmpfs -o mode=755,size=1m tmpfs "$r/dev"
  for n in null zero full random urandom tty; do
    touch "$r/dev/$n"
    mount --bind "/dev/$n" "$r/dev/$n"
  done
  ln -s /proc/self/fd "$r/dev/fd"
  ln -s /proc/self/fd/0 "$r/dev/stdin"
  ln -s /proc/self/fd/1 "$r/dev/stdout"
  ln -s /proc/self/fd/2 "$r/dev/stderr"
  mkdir "$r/dev/pts" "$r/dev/shm"
  mount -t devpts -o newinstance,ptmxmode=0666 devpts "$r/dev/pts"
  ln -s pts/ptmx "$r/dev/ptmx"
  # The tests' /dev/shm: never the host's.
  mount -t tmpfs -o mode=1777,size=2g tmpfs "$r/dev/shm"
  chmod 1777 "$r/tmp"
}

# Run a command in the root with a clean environment.
in_root() {
  local r=$1 t=$2
  shift 2
  timeout --kill-after=20 "$t" chroot "$r" /usr/bin/env -i \
    PATH=/opt/venv/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    HOME=/root LC_ALL=C.UTF-8 TMPDIR=/tmp "${PIP_ENV[@]}" "$@"
}

# pip's settings in the root: the host's CA bundle is copied into it (the
# registry may sit behind a proxy with its own certificate), and the host's
# index settings apply (file:// indexes excepted: they are not in the root).
pip_env() {
  PIP_ENV=(PIP_CERT=/etc/ssl/certs/ca-certificates.crt PIP_DISABLE_PIP_VERSION_CHECK=1
    PIP_NO_CACHE_DIR=1 PIP_DEFAULT_TIMEOUT="${PIP_DEFAULT_TIMEOUT:-60}")
  local line
  while IFS= read -r line; do
    [[ -n $line ]] && PIP_ENV+=("$line")
  done < <(python3 - <<'EOF'
import configparser, os
cfg = configparser.ConfigParser()
cfg.read([os.environ.get("PIP_CONFIG_FILE") or "/etc/pip.conf",
          os.path.expanduser("~/.config/pip/pip.conf"), os.path.expanduser("~/.pip/pip.conf")])
def urls(key):
    value = os.environ.get("PIP_" + key.upper().replace("-", "_")) or cfg.get("global", key, fallback="")
    return " ".join(u for u in value.split() if not u.startswith("file:"))
for key in ("index-url", "extra-index-url", "trusted-host"):
    if urls(key):
        print(f"PIP_{key.upper().replace('-', '_')}={urls(key)}")
for key in ("http_proxy", "https_proxy", "no_proxy"):
    if os.environ.get(key):
        print(f"{key}={os.environ[key]}")
EOF
  )
}

inner_root() { # build the root tarball (cold runs only)
  [[ $BINFMT == private ]] && private_binfmt
  mount -t tmpfs -o mode=700 tmpfs "$WORK" # mmdebstrap's scratch space
  local part=${ROOT_TAR%.tar.zst}.part.tar.zst
  rm -f "$part"
  local inc
  inc=$(IFS=,; echo "${ROOT_PKGS[*]}")
  TMPDIR=$WORK timeout --kill-after=30 "$T_ROOT" mmdebstrap --quiet \
    --arch=arm64 --variant=apt --mode=root --format=tar --include="$inc" \
    --skip=chroot/mount/sys \
    --aptopt='APT::Install-Recommends "false"' \
    --aptopt='Acquire::Check-Valid-Until "false"' \
    --dpkgopt='path-exclude=/usr/share/doc/*' --dpkgopt='path-exclude=/usr/share/man/*' \
    --dpkgopt='path-exclude=/usr/share/locale/*' \
    "$SUITE" "$part" "${MIRRORS[@]}"
  mv "$part" "$ROOT_TAR"
}

inner_test() { # unpack, build the venv if needed, install, inspect the core, run pytest
  [[ $BINFMT == private ]] && private_binfmt
  mount -t tmpfs -o mode=755 tmpfs "$WORK"
  local r=$WORK/root t0=$SECONDS
  mkdir "$r"
  # Device nodes are left out: /dev is a tmpfs of our own (mount_root).
  zstd -dcq "$ROOT_TAR" | tar -x -p --numeric-owner --exclude='./dev/*' -C "$r"
  log "root unpacked in $((SECONDS - t0)) s"
  mount_root "$r"
  cp -L /etc/resolv.conf "$r/etc/resolv.conf" 2>/dev/null || true
  mkdir -p "$r/etc/ssl/certs"
  [[ ! -s /etc/ssl/certs/ca-certificates.crt ]] || cp /etc/ssl/certs/ca-certificates.crt "$r/etc/ssl/certs/"
  pip_env

  if [[ -s $VENV_TAR ]]; then
    zstd -dcq "$VENV_TAR" | tar -x -C "$r/opt"
  else
    log "venv: pip install --only-binary=:all: (PyPI aarch64 wheels, under emulation)"
    t0=$SECONDS
    cp "$REQS" "$r/tmp/requirements.txt"
    in_root "$r" "$T_VENV" /usr/bin/python3 -m venv /opt/venv
    in_root "$r" "$T_VENV" /opt/venv/bin/python -m pip install -q --only-binary=:all: \
      -r /tmp/requirements.txt
    local part=${VENV_TAR%.tar.zst}.part.tar.zst
    tar -C "$r/opt" -cf - venv | zstd -q -T0 -o "$part" -f
    mv "$part" "$VENV_TAR"
    log "venv built and cached in $((SECONDS - t0)) s"
    echo "venv_built=$((SECONDS - t0))" >>"$RESULT"
  fi
  log "venv: $(in_root "$r" 120 python -m pip freeze --all | tr '\n' ' ')"

  # The source tree: tracked and untracked files that git does not ignore, as
  # they are in the work tree; the build happens in the root, never in the checkout.
  mkdir "$r/src"
  git -C "$SRC" ls-files -z -co --exclude-standard |
    tar -C "$SRC" --null -T - --ignore-failed-read -cf - 2>/dev/null | tar -x -C "$r/src"
  t0=$SECONDS
  in_root "$r" "$T_INSTALL" sh -c 'cd /src && python -m pip install -q --no-deps \
    --no-build-isolation --no-index . >/tmp/install.log 2>&1' ||
    { tail -40 "$r/tmp/install.log" >&2; die "pip install of the project failed in the root"; }
  log "pip install (the core built by the root's gcc) in $((SECONDS - t0)) s"

  local so core
  core=$(in_root "$r" 120 sh -c 'cd / && python -c "import platform, shmcast.broker._core as m
print(m.__file__, platform.machine(), m.COMPILER.replace(\" \", \"_\"))"') ||
    die "the compiled core does not import in the root"
  read -r so machine compiler <<<"$core"
  local dis
  dis=$(in_root "$r" 300 objdump -d -f --no-show-raw-insn "$so") || die "objdump -d $so failed"
  {
    echo "machine=$machine"
    echo "compiler=${compiler//_/ }"
    echo "so=$(basename "$so")"
    echo "format=$(sed -n 's/.*file format //p' <<<"$dis" | head -1)"
    for insn in ldar stlr ldaxr stlxr ldapr; do
      echo "$insn=$(grep -cE "^\s+[0-9a-f]+:\s+$insn\s" <<<"$dis" || true)"
    done
    echo "dmb=$(grep -cE '^\s+[0-9a-f]+:\s+dmb\s' <<<"$dis" || true)"
    echo "lse_helpers=$(grep -oE '<__aarch64_[a-z0-9_]+' <<<"$dis" | sort -u | tr -d '<' | tr '\n' ' ')"
  } >>"$RESULT"

  local rc=0
  log "pytest ${PYTEST_ARGS[*]}"
  in_root "$r" "$T_PYTEST" sh -c 'cd /src && exec "$@"' sh \
    env SHMCAST_CORE=c SHMCAST_TEST_EMULATOR="$QEMU" \
    python -m pytest -p no:cacheprovider --junitxml=/tmp/junit.xml "${PYTEST_ARGS[@]}" || rc=$?
  echo "pytest_rc=$rc" >>"$RESULT"
  [[ -s $r/tmp/junit.xml ]] && cp "$r/tmp/junit.xml" "$RUN/junit.xml"
  return 0
}

if [[ ${1:-} == --inner-root || ${1:-} == --inner-test ]]; then
  step=$1
  shift
  PYTEST_ARGS=("$@")
  # The work dir's mounts stay in this namespace; the root is a tmpfs under it.
  if [[ $step == --inner-root ]]; then inner_root; else inner_test; fi
  exit 0
fi

# ------------------------------------------------------------ on the host

PYTEST_ARGS=(-m engine "${ENGINE_FILES[@]}" "$@")

[[ $(uname -s) == Linux ]] || skip "it needs Linux (futex, namespaces, binfmt_misc)"
[[ $(id -u) == 0 ]] || skip "it needs root (apt-get, mmdebstrap, mount and user namespaces, chroot)"
case $(uname -m) in
  x86_64) ;;
  aarch64) skip "this machine is aarch64: run make test natively, no emulation needed" ;;
  *) skip "it runs on x86-64 hosts only, not on $(uname -m)" ;;
esac
{ command -v unshare && command -v setpriv; } >/dev/null ||
  skip "util-linux's unshare and setpriv are missing"
command -v git >/dev/null || skip "git is missing (the source tree is taken from git ls-files)"
python3 -c 'import tomllib' 2>/dev/null || skip "python3 >= 3.11 (tomllib) is missing on the host"

STARTED=$SECONDS
mkdir -p "$CACHE"
exec 9>"$CACHE/lock"
if ! flock -n 9; then
  log "waiting for another make test-arm64 to finish"
  flock -w "$T_LOCK" 9 || fail "another make test-arm64 holds $CACHE/lock"
fi
RUN=$CACHE/run
WORK=$CACHE/work
RESULT=$RUN/result
rm -rf "$RUN"
mkdir -p "$RUN" "$WORK"

# 1. Host packages.
missing=()
for p in "${HOST_PKGS[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done
if ((${#missing[@]})); then
  command -v apt-get >/dev/null || skip "apt-get is missing: install ${missing[*]} by hand"
  log "apt-get install ${missing[*]}"
  timeout "$T_APT" apt-get update -qq || fail "apt-get update failed"
  DEBIAN_FRONTEND=noninteractive timeout "$T_APT" apt-get install -y -qq \
    --no-install-recommends "${missing[@]}" >/dev/null || fail "apt-get install ${missing[*]} failed"
fi
QEMU=$(qemu-aarch64-static --version | sed -n '1s/.*version \([^ ]*\).*/qemu-aarch64 \1/p')
QEMU_DEB=$(dpkg-query -W -f='${Version}' qemu-user-static)

# 2. binfmt_misc: an instance of our own user namespace, else the host's.
BINFMT=private
HOST_NOTE=$CACHE/binfmt-to-restore
restore_host_binfmt() { # put the host's binfmt back as the note says
  [[ -s $HOST_NOTE ]] || return 0
  local mounted entry
  read -r mounted entry <"$HOST_NOTE"
  local e=/proc/sys/fs/binfmt_misc/qemu-aarch64
  if [[ -e $e && $entry == absent ]]; then
    echo -1 >"$e" # removes the handler we registered
  elif [[ -e $e && $entry == disabled ]]; then
    echo 0 >"$e"
  fi
  if [[ $mounted == no ]]; then umount /proc/sys/fs/binfmt_misc || true; fi
  rm -f "$HOST_NOTE"
  log "host binfmt_misc put back as found (mounted: $mounted, qemu-aarch64: $entry)"
}
restore_host_binfmt # a run killed by SIGKILL left the host's handler changed
probe=$(timeout 30 unshare --user --map-root-user --mount --propagation private \
  sh -c 'mount -t binfmt_misc binfmt_misc /proc/sys/fs/binfmt_misc' 2>&1) || BINFMT=host
if [[ ${SHMCAST_ARM64_BINFMT:-} == host ]]; then BINFMT=host; fi # to test that path
if [[ $BINFMT == host ]]; then
  log "binfmt_misc cannot be mounted in a user namespace here (Linux < 6.7?: ${probe:-forced})"
  log "using the host's binfmt_misc; it is put back as found at the end"
  e=/proc/sys/fs/binfmt_misc/qemu-aarch64
  if mountpoint -q /proc/sys/fs/binfmt_misc; then was_mounted=yes; else was_mounted=no; fi
  if [[ $was_mounted == no ]]; then
    mount -t binfmt_misc binfmt_misc /proc/sys/fs/binfmt_misc ||
      skip "binfmt_misc cannot be mounted here (a container without the privilege?)"
  fi
  if [[ ! -e $e ]]; then was=absent; elif grep -qx enabled "$e"; then was=enabled; else was=disabled; fi
  echo "$was_mounted $was" >"$HOST_NOTE"
  trap restore_host_binfmt EXIT
  case $was in
    absent) cat /usr/lib/binfmt.d/qemu-aarch64.conf >/proc/sys/fs/binfmt_misc/register ;;
    disabled) echo 1 >"$e" ;;
  esac
  grep -q '^flags: .*F' "$e" || fail "the host's qemu-aarch64 binfmt handler lacks the F flag"
fi

# Run "$0 --inner-* ARGS" as PID 1's child in new mount and PID namespaces (and
# a user namespace mapping every id to itself, for the private binfmt_misc):
# if this shell dies, even by SIGKILL, setpriv's death signal kills unshare,
# whose --kill-child kills the namespace's init, and the kernel then kills
# every process in it and drops every mount.
in_namespaces() {
  local t=$1 child rc=0 sig='' s go
  shift
  local ns=(--mount --pid --fork --kill-child --propagation private)
  if [[ $BINFMT == private ]]; then
    go=$RUN/go
    rm -f "$go"
    mkfifo -m 600 "$go"
    # The ids are mapped from here once unshare(2) made the user namespace; the
    # child waits for that on the fifo. Its first exec ran unmapped, without
    # capabilities, so the exec after the mapping gains them, and that clears
    # the death signal --kill-child gave it: setpriv sets it again.
    # shellcheck disable=SC2016  # $0 and $@ are the inner shell's
    setpriv --pdeathsig KILL unshare --user "${ns[@]}" -- /bin/bash -c \
      'read -r _ <"$0" && exec setpriv --pdeathsig KILL timeout --kill-after=30 "$@"' "$go" "$t" \
      /bin/bash "$SCRIPT" "$@" &
    child=$!
    for ((s = 0; s < 1000; s++)); do
      [[ $(readlink "/proc/$child/ns/user") != "$(readlink /proc/$$/ns/user)" ]] && break
      sleep 0.01
    done
    { echo "0 0 4294967295" >"/proc/$child/uid_map" && echo "0 0 4294967295" >"/proc/$child/gid_map"; } ||
      fail "could not map the ids of the run's user namespace"
    echo go >"$go"
    rm -f "$go"
  else
    setpriv --pdeathsig KILL unshare "${ns[@]}" -- \
      timeout --kill-after=30 "$t" /bin/bash "$SCRIPT" "$@" &
    child=$!
  fi
  # unshare --fork ignores SIGINT and SIGTERM: pass them on as SIGKILL.
  for s in INT TERM HUP; do
    # shellcheck disable=SC2064
    trap "sig=$s; kill -KILL $child 2>/dev/null" "$s"
  done
  while :; do
    wait "$child" && rc=0 || rc=$?
    kill -0 "$child" 2>/dev/null || break
  done
  trap - INT TERM HUP
  [[ -z $sig ]] || fail "interrupted by SIG$sig"
  return "$rc"
}
export BINFMT CACHE WORK RUN RESULT QEMU

# 3. The root tarball, keyed by what goes into it.
key=$(printf '%s\n' "$SUITE" "${ROOT_PKGS[@]}" "${MIRRORS[@]}" | sha256sum | cut -c1-12)
export ROOT_TAR=$CACHE/root-$SUITE-arm64-$key.tar.zst
cold=""
if [[ ! -s $ROOT_TAR ]]; then
  log "building the arm64 root with mmdebstrap (cold: 5-15 minutes)"
  t0=$SECONDS
  in_namespaces $((T_ROOT + 60)) --inner-root || fail "mmdebstrap could not build the arm64 root"
  log "root built in $(elapsed $((SECONDS - t0))): $(du -h "$ROOT_TAR" | cut -f1)"
  cold="root built in $(elapsed $((SECONDS - t0)))"
fi

# 4. The venv's requirements, from pyproject.toml: build system, runtime, test extra.
export REQS=$RUN/requirements.txt
python3 - "$SRC/pyproject.toml" "${NOT_IN_ROOT[@]}" >"$REQS" <<'EOF'
import re, sys, tomllib
with open(sys.argv[1], "rb") as f:
    p = tomllib.load(f)
skip = set(sys.argv[2:])
reqs = p["build-system"]["requires"] + p["project"]["dependencies"]
reqs += p["project"]["optional-dependencies"]["test"]
for r in reqs:
    if re.split(r"[<>=!~;\[ ]", r, maxsplit=1)[0].lower() not in skip:
        print(r)
EOF
vkey=$(cat <(echo "$key") "$REQS" | sha256sum | cut -c1-12)
export VENV_TAR=$CACHE/venv-$vkey.tar.zst
# Old tarballs (other keys) go: the cache holds what the current tree needs.
find "$CACHE" -maxdepth 1 \( -name 'root-*.tar.zst' -o -name 'venv-*.tar.zst' \) ! -name "$(basename "$ROOT_TAR")" \
  ! -name "$(basename "$VENV_TAR")" -delete

# 5. Install and test.
in_namespaces $((T_VENV + T_INSTALL + T_PYTEST + 600)) --inner-test "${PYTEST_ARGS[@]}" ||
  fail "the run in the arm64 root stopped before its end (see above)"

# 6. The summary.
declare -A R=()
while IFS='=' read -r k v; do R[$k]=$v; done <"$RESULT"
counts=$(python3 - "$RUN/junit.xml" <<'EOF'
import sys, xml.etree.ElementTree as ET
try:
    suites = ET.parse(sys.argv[1]).getroot()
except (OSError, ET.ParseError):
    print("no test report"); sys.exit()
n = {k: sum(int(s.get(k, 0)) for s in suites.iter("testsuite")) for k in ("tests", "failures", "errors", "skipped")}
passed = n["tests"] - n["failures"] - n["errors"] - n["skipped"]
print(f"{passed} passed, {n['failures'] + n['errors']} failed, {n['skipped']} skipped")
EOF
)
acqrel="${R[ldar]:-0} ldar, ${R[stlr]:-0} stlr"
found=no
((${R[ldar]:-0} > 0 && ${R[stlr]:-0} > 0)) && found=yes
rc=${R[pytest_rc]:-1}
notes=$cold
[[ -z ${R[venv_built]:-} ]] || notes="${notes:+$notes, }venv built in $(elapsed "${R[venv_built]}")"
when="warm: root and venv from $CACHE"
[[ -z $notes ]] || when="cold: $notes"
verdict=PASSED
{ [[ $rc == 0 && $found == yes ]]; } || verdict=FAILED
echo
echo "qemu-user runs the aarch64 code under this x86-64 CPU's memory ordering (TSO): this run proves"
echo "that the compiled core builds, runs and passes the engine's tests on aarch64 and that its build"
echo "emits acquire/release instructions; it cannot reveal a weak-ordering bug."
echo "core: ${R[so]:-?} (${R[format]:-?}), built by ${R[compiler]:-?}: ${acqrel}, ${R[ldaxr]:-0} ldaxr," \
  "${R[stlxr]:-0} stlxr, ${R[dmb]:-0} dmb; atomics helpers: ${R[lse_helpers]:-none}"
echo "make test-arm64: $verdict: $counts under $QEMU (Debian $QEMU_DEB), binfmt $BINFMT," \
  "platform.machine() ${R[machine]:-?}, ldar/stlr found: $found ($acqrel), $(elapsed $((SECONDS - STARTED)))" \
  "($when)"
[[ $verdict == PASSED ]]
