#!/bin/sh
# The canary's shift and rollback handler for the flask-todo demo: sets the
# canary's share of traffic on the demo service (service.py). Idempotent:
# it sets the weight, never adds to it.
#
# usage: shift.sh WEIGHT [SERVICE_URL]   (default http://127.0.0.1:9000)
set -eu
weight=${1:?usage: shift.sh WEIGHT [SERVICE_URL]}
url=${2:-http://127.0.0.1:9000}
# What the pipeline built (the canary writes it out for each call); a real
# handler would ship it before moving traffic.
if [ -n "${DEVFLEET_DEPLOY_TREE:-}" ]; then
  echo "shift.sh: $(find "$DEVFLEET_DEPLOY_TREE" -type f | wc -l) files built by plan ${DEVFLEET_DEPLOY_PLAN_ID:-?}" >&2
fi
exec python3 -c '
import sys, urllib.request
url, weight = sys.argv[1].rstrip("/"), sys.argv[2]
request = urllib.request.Request(f"{url}/weight?value={weight}", method="POST")
with urllib.request.urlopen(request, timeout=10) as response:
    print(response.read().decode())
' "$url" "$weight"
