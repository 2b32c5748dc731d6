#!/bin/sh
# Development only (compose.tls.yaml): a throwaway CA and one server certificate for the
# compose services (rabbitmq, postgres, localhost, 127.0.0.1), written to $1 (default
# /certs) once; a later run keeps what is there. Production uses its own PKI (cert-manager,
# the platform's CA): docs/runbook.md, TLS.
set -eu
dir="${1:-/certs}"
if [ -s "$dir/server.crt" ]; then
  echo "dev-certs: $dir already holds certificates"
  exit 0
fi
mkdir -p "$dir"
cd "$dir"
openssl req -x509 -new -nodes -newkey ec -pkeyopt ec_paramgen_curve:P-256 -days 365 \
  -subj "/CN=identity development CA" -keyout ca.key -out ca.crt \
  -addext "basicConstraints=critical,CA:true" -addext "keyUsage=critical,keyCertSign,cRLSign"
openssl req -new -nodes -newkey ec -pkeyopt ec_paramgen_curve:P-256 \
  -subj "/CN=identity development server" -keyout server.key -out server.csr
printf '%s\n' \
  "subjectAltName=DNS:rabbitmq,DNS:postgres,DNS:localhost,IP:127.0.0.1" \
  "extendedKeyUsage=serverAuth" "basicConstraints=critical,CA:false" >server.ext
openssl x509 -req -in server.csr -CA ca.crt -CAkey ca.key -CAcreateserial -days 365 \
  -extfile server.ext -out server.crt
rm -f server.csr server.ext ca.srl ca.key
# RabbitMQ and PostgreSQL both run as uid 999 in their images; PostgreSQL insists that its
# key is private to it.
chown 999:999 server.key
chmod 600 server.key
chmod 644 ca.crt server.crt
echo "dev-certs: CA and server certificate written to $dir"
