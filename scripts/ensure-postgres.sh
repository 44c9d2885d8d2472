#!/usr/bin/env bash
# Make sure PostgreSQL server binaries (initdb, pg_ctl, postgres) are installed, so that
# tests/pg.py can start a throwaway server. Idempotent: does nothing when they exist.
#
# Installs Debian/Ubuntu's `postgresql` package non-interactively (root, or sudo without a
# password). No cluster is created or started: the tests run their own server on a free
# port as the `postgres` OS user the package creates.
#
# Usage: scripts/ensure-postgres.sh        (prints the bin directory on success)
set -euo pipefail

find_bindir() {
  local d
  if [[ -n "${SWAPSERVE_PG_BINDIR:-}" && -x "${SWAPSERVE_PG_BINDIR}/initdb" && -x "${SWAPSERVE_PG_BINDIR}/pg_ctl" ]]; then
    echo "${SWAPSERVE_PG_BINDIR}"; return 0
  fi
  if command -v pg_config >/dev/null 2>&1; then
    d="$(pg_config --bindir 2>/dev/null || true)"
    if [[ -n "$d" && -x "$d/initdb" && -x "$d/pg_ctl" ]]; then echo "$d"; return 0; fi
  fi
  if command -v initdb >/dev/null 2>&1 && command -v pg_ctl >/dev/null 2>&1; then
    dirname "$(command -v initdb)"; return 0
  fi
  # Newest major version first.
  for d in $(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -t/ -k5 -n -r); do
    if [[ -x "$d/initdb" && -x "$d/pg_ctl" ]]; then echo "$d"; return 0; fi
  done
  return 1
}

check_user() {
  # postgres refuses to run as root; tests/pg.py runs it as this user when we are root.
  if [[ "$(id -u)" == 0 ]] && ! id postgres >/dev/null 2>&1; then
    echo "ensure-postgres: binaries found but there is no 'postgres' OS user;" \
         "reinstall the postgresql package (apt-get install --reinstall postgresql-common)" >&2
    exit 1
  fi
}

if bindir="$(find_bindir)"; then
  check_user
  echo "$bindir"
  exit 0
fi

# shellcheck source=lib/apt.sh
. "$(dirname "$0")/lib/apt.sh"
need_root ensure-postgres "install the 'postgresql' package, or set SWAPSERVE_PG_BINDIR"

export DEBIAN_FRONTEND=noninteractive
# Tests start their own server: do not let the package create and start a cluster on 5432
# (a drop-in, so postgresql-common's own createcluster.conf stays untouched).
"${SUDO[@]}" mkdir -p /etc/postgresql-common/createcluster.d
echo "create_main_cluster = false" | "${SUDO[@]}" tee /etc/postgresql-common/createcluster.d/swapserve-tests.conf >/dev/null
apt_install postgresql

if ! bindir="$(find_bindir)"; then
  echo "ensure-postgres: installed 'postgresql' but found no initdb/pg_ctl" >&2
  exit 1
fi
check_user
echo "$bindir"
