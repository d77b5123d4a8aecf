#!/usr/bin/env bash
# Installs the Debian packages listed in .ci/system-packages.txt that are missing. The tests that
# need them run real servers (brokers, a browser); without root or apt-get this only says what is
# missing, and those tests skip with the reason.
set -euo pipefail
cd "$(dirname "$0")"
missing=()
while read -r pkg _; do
    [[ -z "$pkg" || "$pkg" == \#* ]] && continue
    dpkg -s "$pkg" >/dev/null 2>&1 || missing+=("$pkg")
done < system-packages.txt
[[ ${#missing[@]} -eq 0 ]] && exit 0
if [[ $(id -u) -eq 0 ]] && command -v apt-get >/dev/null; then
    apt-get update -q
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}"
else
    echo "system-packages: missing ${missing[*]} (needs root and apt-get); their tests will skip" >&2
fi
