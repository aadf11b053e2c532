# Sourced by the other scripts: makes sure uv and the project's Python packages are installed.
# shellcheck shell=bash
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

if command -v uv >/dev/null 2>&1; then
  UV=(uv)
elif python3 -m uv --version >/dev/null 2>&1; then
  UV=(python3 -m uv)
else
  echo "installing uv (from PyPI)..." >&2
  python3 -m pip install --quiet --disable-pip-version-check uv
  UV=(python3 -m uv)
fi

# Installs exactly what uv.lock pins; fails if pyproject.toml and the lock disagree.
"${UV[@]}" sync --frozen --all-groups --quiet

# apt_install PACKAGE... : install Debian packages that are missing (as root, or through sudo).
apt_install() {
  local missing=()
  for pkg in "$@"; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
  done
  [ ${#missing[@]} -eq 0 ] && return 0
  local sudo=()
  [ "$(id -u)" -eq 0 ] || sudo=(sudo)
  echo "installing Debian packages: ${missing[*]}" >&2
  "${sudo[@]}" apt-get update -qq
  DEBIAN_FRONTEND=noninteractive "${sudo[@]}" apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
}
