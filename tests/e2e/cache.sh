# shellcheck shell=bash disable=SC2034,SC2154 # sets variables for, and reads $here from, its callers
# Sourced by install.sh and run.sh (which set $here to tests/e2e): where the e2e's installed
# tools live. Not in the checkout: the `postgres` user runs barman-cloud from the venv (backups,
# archive_command), and a checkout may sit under a folder only its owner can enter (/root is
# 0700 on Debian, as is every mktemp -d), which would hide a venv inside it from that user.
# So they live in a root-owned folder every user can enter, one per hash of the pinned inputs:
# checkouts on one machine share an install, one with other pins gets its own beside it.
# E2E_CACHE moves it (it must stay reachable by `postgres`; run.sh checks); removing it only
# costs the next run a reinstall.
e2e_cache=${E2E_CACHE:-/var/cache/egress-gate-e2e}
e2e_key() { cat "$@" | sha256sum | cut -c1-16; } # content only: the same in every checkout
venv=$e2e_cache/venv-$(e2e_key "$here/requirements.txt")
azurite_dir=$e2e_cache/azurite-$(e2e_key "$here/package.json" "$here/package-lock.json")
