#!/usr/bin/env bash
# The programs some tests drive, from Debian: chromium (tests/serve/test_browser.py) and PostgreSQL (initdb,
# pg_ctl, postgres: the PostgreSQL runs of tests/serve/test_db.py and test_server.py, benchmarks/service_load.py),
# Orthanc with its DICOMweb plugin and dcmtk (storescu, echoscu: tests/dicom/test_listen.py), dicom3tools (dciodvfy:
# every SR the DICOM tests produce is validated).
# Idempotent: installs only what is missing. Needs root (or sudo).
set -euo pipefail
SUDO=""
if [ "$(id -u)" != 0 ]; then SUDO="sudo"; fi
missing=()
command -v chromium >/dev/null 2>&1 || [ -x /usr/bin/chromium ] || missing+=(chromium)
ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || command -v initdb >/dev/null 2>&1 || missing+=(postgresql)
[ -x /usr/sbin/Orthanc ] || command -v Orthanc >/dev/null 2>&1 || missing+=(orthanc)
[ -f /usr/share/orthanc/plugins/libOrthancDicomWeb.so ] || missing+=(orthanc-dicomweb)
[ -x /usr/bin/storescu ] && [ -x /usr/bin/echoscu ] || missing+=(dcmtk)
command -v dciodvfy >/dev/null 2>&1 || missing+=(dicom3tools)
if [ ${#missing[@]} -eq 0 ]; then
  echo "system dependencies present: chromium, postgresql, orthanc, orthanc-dicomweb, dcmtk, dicom3tools"
  exit 0
fi
echo "installing: ${missing[*]}"
$SUDO apt-get update -qq
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${missing[@]}" >/dev/null
