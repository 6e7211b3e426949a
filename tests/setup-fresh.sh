#!/usr/bin/env bash
# scripts/setup on a machine as a newcomer has it: each case runs in a private mount namespace
# (unshare -m) where /etc/apt is a copy holding only the sources the case gives,
# /var/lib/apt/lists is empty, dpkg-query is shadowed so every package reads as missing, and no
# Rust toolchain is on PATH or under HOME. Only apt's configuration is private: the packages the
# set-up lists are installed for real (the same ones the real set-up installs, so on a machine
# that ran it first nothing changes but Debian's cargo-web/rustc-web added beside rustup's).
# Needs root and the apt archive; run by .ci/run after the real set-up.
#   case deb822:  only /etc/apt/sources.list.d/debian.sources (a fresh Debian 12) → exit 0, and
#                 bookworm-backports added with the same mirror URI
#   case classic: only a one-line /etc/apt/sources.list → the same
#   case broken:  apt-get fails → exit ≠ 0, the step's name and the command's last lines printed
set -euo pipefail
cd "$(dirname "$0")/.."
[ "$(id -u)" = 0 ] || { echo "setup-fresh: needs root (unshare -m, mount)" >&2; exit 1; }
deb822=/etc/apt/sources.list.d/debian.sources
[ -f "$deb822" ] || { echo "setup-fresh: $deb822 missing: this test copies a Debian 12 machine's sources" >&2; exit 1; }

work=$(mktemp -d /tmp/abox-setup-fresh.XXXXXX)
trap 'rm -rf "$work"' EXIT
before=$(ls -l /etc/apt/sources.list.d; cat /etc/apt/sources.list 2>/dev/null || true)
uri=$(awk 'BEGIN { RS = "" } /Suites:[^\n]*bookworm( |\n|$)/ { for (i = 1; i <= NF; i++) if ($i == "URIs:") { print $(i + 1); exit } }' "$deb822")
[ -n "$uri" ] || { echo "setup-fresh: no bookworm entry in $deb822" >&2; exit 1; }

fail() { echo "setup-fresh: $1: FAILED — $2" >&2; exit 1; }

# one_case NAME EXPECT_RC [apt-get stand-in]: lays /etc/apt out as $work/NAME/apt (already filled
# by the caller) and runs scripts/setup in a private mount namespace; its output in NAME/out.
one_case() {
  local name=$1 expect=$2 rc=0
  local d=$work/$name
  mkdir -p "$d/bin" "$d/lists"
  printf '#!/bin/sh\n# every package reads as missing\nexit 1\n' >"$d/bin/dpkg-query"
  chmod +x "$d/bin/dpkg-query"
  mkdir -p "$d/home"
  # No Rust of the user's: HOME is empty and PATH holds the system's folders only, so setup
  # installs a toolchain new enough for the project (or says why it cannot).
  unshare -m --propagation private bash -c '
    set -e
    mount --bind "$1/apt" /etc/apt
    mount -t tmpfs tmpfs /var/lib/apt/lists
    HOME="$1/home" PATH="$1/bin:/usr/sbin:/usr/bin:/sbin:/bin" ABOX_SETUP_LOG="$1/setup.log" exec scripts/setup' _ "$d" >"$d/out" 2>&1 || rc=$?
  sed "s/^/  [$name] /" "$d/out" | tail -n 40
  if [ "$expect" = 0 ]; then
    [ "$rc" = 0 ] || fail "$name" "scripts/setup exited $rc"
    grep -q '^setup: ready$' "$d/out" || fail "$name" "no ready line"
    local added=$d/apt/sources.list.d/bookworm-backports.sources
    [ -f "$added" ] || fail "$name" "no bookworm-backports source added"
    grep -qx "URIs: $uri" "$added" || fail "$name" "backports source does not reuse $uri: $(cat "$added")"
    grep -q '^+ apt-get install -y -q -t bookworm-backports qemu-system-x86 qemu-utils e2fsprogs$' "$d/setup.log" ||
      fail "$name" "backports packages not installed from bookworm-backports"
    local v
    v=$(PATH=/usr/sbin:/usr/bin:/sbin:/bin cargo --version) || fail "$name" "no cargo on the system PATH after setup"
    [ "$(echo "$v" | awk '{ split($2, a, "."); print a[2] }')" -ge 88 ] || fail "$name" "cargo too old for the project: $v"
  else
    [ "$rc" != 0 ] || fail "$name" "scripts/setup exited 0 although apt-get failed"
    grep -q 'setup: step "apt-get update" failed (exit 100): apt-get update -q' "$d/out" ||
      fail "$name" "the failing step is not named"
    grep -q 'E: stand-in failure for the test' "$d/out" || fail "$name" "the command's last lines are not shown"
  fi
  echo "setup-fresh: $name: ok"
}

fresh_apt() {
  local d=$work/$1
  mkdir -p "$d"
  cp -a /etc/apt "$d/apt"
  rm -f "$d/apt/sources.list"
  find "$d/apt/sources.list.d" -mindepth 1 -delete
}

# A fresh Debian 12: its sources only in the deb822 file.
fresh_apt deb822
cp "$deb822" "$work/deb822/apt/sources.list.d/"
one_case deb822 0

# A classic machine: one-line sources.list, nothing in sources.list.d.
fresh_apt classic
printf 'deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] %s bookworm main\n' "$uri" \
  >"$work/classic/apt/sources.list"
one_case classic 0

# A failing step says which and shows what the command printed.
fresh_apt broken
cp "$deb822" "$work/broken/apt/sources.list.d/"
mkdir -p "$work/broken/bin"
printf '#!/bin/sh\necho "E: stand-in failure for the test" >&2\nexit 100\n' >"$work/broken/bin/apt-get"
chmod +x "$work/broken/bin/apt-get"
one_case broken 1

after=$(ls -l /etc/apt/sources.list.d; cat /etc/apt/sources.list 2>/dev/null || true)
[ "$before" = "$after" ] || fail all "the machine's own apt sources changed"
echo "setup-fresh: 3 passed, 0 failed"
