#!/usr/bin/env bash
# Self-signed CA + SuperLink server certificate for NMoE-Flower deployments.
#
# Usage: scripts/generate_certs.sh [OUT_DIR] [EXTRA_SAN ...]
#   OUT_DIR    folder for the files (default: certificates/)
#   EXTRA_SAN  more subjectAltName entries for the server, e.g. DNS:server.lan IP:10.0.0.5
#              (localhost and 127.0.0.1 are always included)
#
# Idempotent: existing files are kept; delete OUT_DIR to issue new ones.
#
# Which file goes where:
#   ca.crt      CA certificate (public). Server: flower-superlink --ssl-ca-certfile ca.crt
#               Every device: flower-supernode --root-certificates ca.crt
#               The machine that runs `flwr`: root-certificates = "/abs/path/ca.crt" in
#               the connection of $FLWR_HOME/config.toml
#   server.pem  SuperLink certificate (public). Server: flower-superlink --ssl-certfile server.pem
#   server.key  SuperLink private key (SECRET, server only): --ssl-keyfile of flower-superlink
#   ca.key      CA private key (SECRET): keep it offline; it only signs server certificates.
set -euo pipefail

OUT_DIR="${1:-certificates}"
shift || true
DAYS=825
KEY_BITS=4096
CA_SUBJECT="/CN=NMoE-Flower local CA"
SERVER_SUBJECT="/CN=localhost"

SAN="DNS:localhost,IP:127.0.0.1,IP:::1"
for extra in "$@"; do
  SAN="${SAN},${extra}"
done

mkdir -p "${OUT_DIR}"
cd "${OUT_DIR}"

if [[ -f ca.crt && -f ca.key && -f server.pem && -f server.key ]]; then
  echo "certificates already present in $(pwd); delete the folder to issue new ones"
  exit 0
fi

umask 077  # private keys readable by the owner only

openssl genrsa -out ca.key "${KEY_BITS}" 2>/dev/null
openssl req -x509 -new -key ca.key -sha256 -days "${DAYS}" -subj "${CA_SUBJECT}" \
  -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign" \
  -out ca.crt

openssl genrsa -out server.key "${KEY_BITS}" 2>/dev/null
openssl req -new -key server.key -subj "${SERVER_SUBJECT}" -out server.csr
EXT_FILE="$(mktemp)"
trap 'rm -f "${EXT_FILE}"' EXIT
cat >"${EXT_FILE}" <<EOF
basicConstraints=CA:FALSE
keyUsage=critical,digitalSignature,keyEncipherment
extendedKeyUsage=serverAuth
subjectAltName=${SAN}
EOF
openssl x509 -req -in server.csr -CA ca.crt -CAkey ca.key -CAcreateserial -days "${DAYS}" -sha256 \
  -extfile "${EXT_FILE}" -out server.pem 2>/dev/null
rm -f server.csr ca.srl
chmod 644 ca.crt server.pem

openssl verify -CAfile ca.crt server.pem
echo "wrote ca.crt ca.key server.pem server.key to $(pwd)"
