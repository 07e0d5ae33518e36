#!/usr/bin/env bash
# Run the test suite on a fresh Debian machine: install the DICOM tools the
# tests drive (DCMTK as the scanner, Orthanc as the PACS, dicom3tools'
# dciodvfy as the validator), install the package, then run pytest.
set -euo pipefail
cd "$(dirname "$0")/.."

missing=()
command -v storescu >/dev/null || missing+=(dcmtk)
command -v Orthanc >/dev/null || [ -x /usr/sbin/Orthanc ] || missing+=(orthanc)
command -v dciodvfy >/dev/null || missing+=(dicom3tools)
if [ ${#missing[@]} -gt 0 ]; then
    sudo_cmd=()
    [ "$(id -u)" -eq 0 ] || sudo_cmd=(sudo)
    "${sudo_cmd[@]}" apt-get update -qq
    DEBIAN_FRONTEND=noninteractive "${sudo_cmd[@]}" apt-get install -y -qq "${missing[@]}"
fi

./deploy/install.sh

status=0
.venv/bin/python -m pytest "$@" || status=$?
if [ "$status" -eq 5 ]; then
    echo "pytest collected no tests: treating this as a failure" >&2
    exit 1
fi
exit "$status"
