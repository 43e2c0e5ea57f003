"""Docker HEALTHCHECK of the jetinfer image: exit 0 when the worker's /healthz answers 200.

`/healthz` is served on the worker's own event loop, so an answer proves the loop is not blocked.
The port is JETINFER_METRICS_PORT (default 8080), as for `jetinfer serve`. Kubernetes ignores image
health checks and uses the Deployment's probes instead.
"""

from __future__ import annotations

import os
import sys
import urllib.request

__all__ = ["main"]


def main() -> int:
    """Probe http://127.0.0.1:<port>/healthz once; 0 when healthy, 1 otherwise."""
    port = os.environ.get("JETINFER_METRICS_PORT", "8080")
    url = f"http://127.0.0.1:{port}/healthz"
    try:
        with urllib.request.urlopen(url, timeout=3) as response:
            return 0 if response.status == 200 else 1
    except Exception as exc:  # refused, timed out, HTTP error: unhealthy either way
        print(f"{url}: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
