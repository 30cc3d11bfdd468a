#!/usr/bin/env bash
# Checks a live chapeau API socket against api/openapi.yaml with schemathesis: no server
# errors, every status, header and body as the spec says.
#   tests/schemathesis.sh SOCKET [extra schemathesis options]
# SOCKET is the API socket of a running chapeau (or of the fake VMM:
#   cargo run -p api --example fake_server -- /tmp/api.sock &).
# schemathesis speaks TCP, so socat bridges 127.0.0.1:PORT (loopback only) to the socket.
# Not checked: unsupported_method, since methods dbs-uhttp does not know (TRACE, OPTIONS) are
# refused by its parser as malformed HTTP (400) before the path is known; known methods on the
# wrong path get 405 with Allow, which allow_header_conformance checks.
# Bounded: MAX_EXAMPLES per operation (default 50) and MAX_TIME seconds (default 120).
# Needs: pip install schemathesis; apt-get install socat.
set -euo pipefail

socket=${1:?usage: tests/schemathesis.sh SOCKET [schemathesis options]}
shift
[ -S "$socket" ] || { echo "no unix socket at $socket" >&2; exit 2; }
spec="$(cd "$(dirname "$0")/.." && pwd)/api/openapi.yaml"
port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')

socat "TCP-LISTEN:$port,bind=127.0.0.1,reuseaddr,fork" "UNIX-CONNECT:$socket" &
socat_pid=$!
trap 'kill "$socat_pid" 2>/dev/null || true' EXIT
for _ in $(seq 50); do
    (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null && break
    sleep 0.1
done

st run "$spec" \
    --url "http://127.0.0.1:$port" \
    --checks not_a_server_error,status_code_conformance,content_type_conformance,response_schema_conformance,response_headers_conformance,allow_header_conformance \
    --max-examples "${MAX_EXAMPLES:-50}" \
    --max-time "${MAX_TIME:-120}" \
    --request-timeout 10 \
    --workers 1 \
    "$@"
