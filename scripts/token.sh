#!/usr/bin/env bash
# Test keys and access tokens for slotgate's token authentication, with openssl alone.
#
#   scripts/token.sh keys DIR
#       An RSA key pair (DIR/key.pem) and its public key as a JWKS (DIR/jwks.json), the
#       file a [[token_issuers]] entry's jwks_file names.
#   scripts/token.sh mint DIR OID [SECONDS] [ROLE,ROLE…]
#       Prints an RS256 token for user OID (the `oid` claim), valid for SECONDS (default
#       3600), with the given `roles`, signed with DIR/key.pem.
#
# Environment: ISSUER (the `iss` claim, default https://login.example.test/slotgate-demo/v2.0)
# and AUDIENCE (the `aud` claim, default api://slotgate) must match the issuer's entry.
#
# Example (README, "Token authentication"):
#   scripts/token.sh keys /tmp/idp
#   TOKEN=$(scripts/token.sh mint /tmp/idp 6f1c2a3e-0000-4000-8000-000000000001 3600)
#   redis-cli -p 6380 --user 6f1c2a3e-0000-4000-8000-000000000001 --pass "$TOKEN" ping
set -euo pipefail

ISSUER=${ISSUER:-https://login.example.test/slotgate-demo/v2.0}
AUDIENCE=${AUDIENCE:-api://slotgate}

usage() {
    sed -n '2,12p' "$0" | sed 's/^# \{0,1\}//'
    exit 2
}

command -v openssl >/dev/null || {
    echo "token.sh: openssl is needed (apt-get install openssl)" >&2
    exit 1
}

b64url() { openssl base64 -A | tr '+/' '-_' | tr -d '='; }
# Hex digits on stdin to bytes on stdout.
unhex() { perl -ne 's/\s//g; print pack("H*", $_)'; }
# A JSON string: the value must not contain quotes or backslashes (ids, URLs, role names).
json_str() {
    case $1 in *[\"\\]*) echo "token.sh: '$1' has a quote or backslash" >&2; exit 1 ;; esac
    printf '"%s"' "$1"
}

# The key id: the first 16 hex digits of the SHA-256 of the public key (DER).
kid_of() { openssl pkey -in "$1" -pubout -outform DER 2>/dev/null | openssl dgst -sha256 -r | cut -c1-16; }

case ${1:-} in
keys)
    [ $# -eq 2 ] || usage
    dir=$2
    mkdir -p "$dir"
    openssl genpkey -algorithm RSA -pkeyopt rsa_keygen_bits:2048 \
        -pkeyopt rsa_keygen_pubexp:65537 -out "$dir/key.pem" 2>/dev/null
    chmod 600 "$dir/key.pem"
    n=$(openssl rsa -in "$dir/key.pem" -noout -modulus 2>/dev/null | sed 's/^Modulus=//' | unhex | b64url)
    kid=$(kid_of "$dir/key.pem")
    # The exponent is 65537 (set above): AQAB in base64url.
    printf '{"keys":[{"kty":"RSA","use":"sig","alg":"RS256","kid":"%s","n":"%s","e":"AQAB"}]}\n' \
        "$kid" "$n" >"$dir/jwks.json"
    echo "wrote $dir/key.pem (private) and $dir/jwks.json (kid $kid)" >&2
    ;;
mint)
    if [ $# -lt 3 ] || [ $# -gt 5 ]; then usage; fi
    dir=$2 oid=$3 ttl=${4:-3600} roles=${5:-}
    [ -f "$dir/key.pem" ] || { echo "token.sh: no $dir/key.pem (run: $0 keys $dir)" >&2; exit 1; }
    case $ttl in '' | *[!0-9]*) echo "token.sh: SECONDS must be a number" >&2; exit 1 ;; esac
    now=$(date +%s)
    role_list=
    if [ -n "$roles" ]; then
        IFS=, read -r -a parts <<<"$roles"
        for r in "${parts[@]}"; do role_list+="${role_list:+,}$(json_str "$r")"; done
        role_list=",\"roles\":[$role_list]"
    fi
    header=$(printf '{"alg":"RS256","typ":"JWT","kid":"%s"}' "$(kid_of "$dir/key.pem")" | b64url)
    payload=$(printf '{"iss":%s,"aud":%s,"oid":%s,"iat":%d,"nbf":%d,"exp":%d%s}' \
        "$(json_str "$ISSUER")" "$(json_str "$AUDIENCE")" "$(json_str "$oid")" \
        "$now" "$now" "$((now + ttl))" "$role_list" | b64url)
    sig=$(printf '%s.%s' "$header" "$payload" | openssl dgst -sha256 -sign "$dir/key.pem" -binary | b64url)
    printf '%s.%s.%s\n' "$header" "$payload" "$sig"
    ;;
*) usage ;;
esac
