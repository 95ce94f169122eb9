#!/usr/bin/env bash
# make_certs.sh DIR — test PKI for the transport (openssl CLI only; OpenSSL 3.0 or later).
#
# Writes into DIR (created if missing; existing files are overwritten):
#   ca.crt ca.key                      the test CA ("tandem test CA")
#   site-a.crt site-a.key              CN=site-a, SAN DNS:site-a   (signed by ca)
#   site-b.crt site-b.key              CN=site-b, SAN DNS:site-b   (signed by ca)
#   site-c.crt site-c.key              CN=site-c, SAN DNS:site-c   (signed by ca): wrong peer name
#   cn-site-b.crt cn-site-b.key        CN=site-b and no SAN        (signed by ca): CN fallback
#   other-ca.crt other-ca.key          a second, unrelated CA
#   other-site-b.crt other-site-b.key  CN/SAN site-b signed by other-ca: wrong CA
#   expired-site-b.crt expired-site-b.key
#                                      CN/SAN site-b signed by ca, valid 2020-01-01..2020-01-02
# Keys are EC P-256 (fast to make) and mode 0600. Leaf certificates carry
# extendedKeyUsage serverAuth+clientAuth, since each side of the link is both.
#
# `openssl x509 -req -days` cannot make a certificate that is already expired, so the expired
# one is signed with `openssl ca -startdate/-enddate` and a throw-away CA database in DIR/.ca-db.
set -euo pipefail

dir=${1:?usage: make_certs.sh DIR}
mkdir -p "$dir"
cd "$dir"
umask 077

key() { openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out "$1.key" 2>/dev/null; chmod 600 "$1.key"; }

ca() {  # ca NAME SUBJECT
  key "$1"
  openssl req -x509 -new -key "$1.key" -subj "/CN=$2" -days 3650 -sha256 \
    -addext "basicConstraints=critical,CA:TRUE" \
    -addext "keyUsage=critical,keyCertSign,cRLSign" \
    -addext "subjectKeyIdentifier=hash" -out "$1.crt"
}

ext() {  # ext NAME [SAN]: the extension file for a leaf certificate
  {
    echo "basicConstraints=CA:FALSE"
    echo "keyUsage=critical,digitalSignature,keyEncipherment"
    echo "extendedKeyUsage=serverAuth,clientAuth"
    echo "authorityKeyIdentifier=keyid"
    if [ -n "${2:-}" ]; then echo "subjectAltName=DNS:$2"; fi
  } >"$1.ext"
}

serial=1000
leaf() {  # leaf FILE CN ISSUER [SAN]
  local file=$1 cn=$2 issuer=$3 san=${4:-}
  key "$file"
  openssl req -new -key "$file.key" -subj "/CN=$cn" -out "$file.csr"
  ext "$file" "$san"
  serial=$((serial + 1))
  openssl x509 -req -in "$file.csr" -CA "$issuer.crt" -CAkey "$issuer.key" -set_serial "$serial" \
    -days 825 -sha256 -extfile "$file.ext" -out "$file.crt" 2>/dev/null
  rm -f "$file.csr" "$file.ext"
}

ca ca "tandem test CA"
ca other-ca "unrelated test CA"
leaf site-a site-a ca site-a
leaf site-b site-b ca site-b
leaf site-c site-c ca site-c
leaf cn-site-b site-b ca ""
leaf other-site-b site-b other-ca site-b

# The expired certificate: `openssl ca` takes explicit validity dates.
db=.ca-db
rm -rf "$db"
mkdir -p "$db/new"
: >"$db/index.txt"
echo 2000 >"$db/serial"
cat >"$db/ca.cnf" <<EOF
[ ca ]
default_ca = test_ca
[ test_ca ]
dir = $db
database = $db/index.txt
new_certs_dir = $db/new
serial = $db/serial
default_md = sha256
policy = any
unique_subject = no
copy_extensions = none
[ any ]
commonName = supplied
EOF
key expired-site-b
openssl req -new -key expired-site-b.key -subj "/CN=site-b" -out expired-site-b.csr
ext expired-site-b site-b
openssl ca -batch -notext -config "$db/ca.cnf" -cert ca.crt -keyfile ca.key \
  -startdate 20200101000000Z -enddate 20200102000000Z -extfile expired-site-b.ext \
  -in expired-site-b.csr -out expired-site-b.crt 2>/dev/null
rm -rf "$db" expired-site-b.csr expired-site-b.ext

chmod 644 ./*.crt
chmod 600 ./*.key
