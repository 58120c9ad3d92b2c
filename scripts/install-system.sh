#!/usr/bin/env bash
# Installs the Debian packages prognode and its tests need: the real DICOM peers
# (dcmtk, Orthanc with DICOMweb, dicom3tools), PostgreSQL (tests start a private server), Chromium for web tests and OHIF,
# and a C compiler for the loopback-bind shim. Idempotent: a second run that finds
# everything in place does nothing.
set -euo pipefail
PKGS=(dcmtk orthanc orthanc-dicomweb dicom3tools chromium chromium-driver gcc libc6-dev postgresql
      python3-venv nodejs npm openssl sqlite3 make)
missing=()
for p in "${PKGS[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
# nodejs/npm may come from elsewhere (NodeSource); keep those as they are.
if command -v node >/dev/null && command -v npm >/dev/null; then
  filtered=(); for p in "${missing[@]}"; do [[ $p == nodejs || $p == npm ]] || filtered+=("$p"); done
  missing=("${filtered[@]}")
fi
if ((${#missing[@]})); then
  echo "install-system: installing ${missing[*]}"
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
  export DEBIAN_FRONTEND=noninteractive
  $SUDO apt-get update -qq
  # policy-rc.d keeps Debian's orthanc and postgresql services from starting on machines with an init system.
  if [ ! -e /usr/sbin/policy-rc.d ]; then
    printf '#!/bin/sh\nexit 101\n' | $SUDO tee /usr/sbin/policy-rc.d >/dev/null; $SUDO chmod +x /usr/sbin/policy-rc.d; created_policy=1
  fi
  $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}"
  [ -n "${created_policy:-}" ] && $SUDO rm -f /usr/sbin/policy-rc.d
fi
echo "install-system: ok"
