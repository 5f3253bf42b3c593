"""The container's HEALTHCHECK: GET /healthz on the web UI's own port (AUTH_EMAIL_BIND).

Standard library only, so the image needs no curl.
"""

import os
import sys
import urllib.request

bind = os.environ.get("AUTH_EMAIL_BIND", "127.0.0.1:8080")
port = bind.rpartition(":")[2]
try:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=4) as answer:
        sys.exit(0 if answer.status == 200 else 1)
except Exception as error:  # noqa: BLE001 - any failure is "unhealthy"
    print(f"unhealthy: {error}", file=sys.stderr)
    sys.exit(1)
