"""Prometheus metrics of the mail proxy (default registry)."""

from __future__ import annotations

from prometheus_client import Counter, Gauge

SESSIONS_OPEN = Gauge("mailproxy_sessions_open", "Client connections currently open", ["protocol"])
CONNECTIONS_REFUSED = Counter(
    "mailproxy_connections_refused_total",
    "Connections closed at accept: limit, per_ip (connection limits), files (accept() failed "
    "for lack of file descriptors; protocol 'any')",
    ["protocol", "reason"],
)
LOGINS = Counter(
    "mailproxy_logins_total",
    "Client logins by outcome (ok, credentials, throttled, reauth, disabled, unavailable)",
    ["protocol", "result"],
)
UPSTREAM_ERRORS = Counter(
    "mailproxy_upstream_errors_total",
    "Failures talking to the upstream mail server (connect, tls, protocol, token_rejected)",
    ["protocol", "reason"],
)
BYTES_RELAYED = Counter(
    "mailproxy_relayed_bytes_total",
    "Bytes relayed after login; direction is 'in' (client to upstream) or 'out'",
    ["protocol", "direction"],
)
UPSTREAM_CONNECTIONS = Counter(
    "mailproxy_upstream_connections_total",
    "Upstream connections a login used: pooled (made ahead), new, and of those with TLS how "
    "many resumed an earlier TLS session (resumed)",
    ["protocol", "kind"],
)
