# Sourced by the scripts/ensure-*.sh scripts: run apt-get as root (or through passwordless sudo).
#
#   need_root WHO "what to install by hand"   sets SUDO, or prints why it cannot and exits 1
#   apt_install PKG...                        apt-get update, then a quiet non-interactive install

need_root() {
  local who=$1 hint=$2
  if [[ "$(id -u)" == 0 ]]; then
    SUDO=()
  elif command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
    SUDO=(sudo -n)
  else
    echo "$who: not root (and no passwordless sudo); $hint" >&2
    exit 1
  fi
  if ! command -v apt-get >/dev/null 2>&1; then
    echo "$who: no apt-get here; $hint" >&2
    exit 1
  fi
}

apt_install() {
  "${SUDO[@]}" apt-get update -qq
  "${SUDO[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
    -o Dpkg::Options::=--force-confdef -o Dpkg::Options::=--force-confold "$@" >/dev/null
}
