"""Sends every Segment call through segment-analytics-python and rudder-sdk-python, unchanged
and pointed at sluice (tests/sdks.rs), and prints what each SDK reported as one JSON line.

Usage: sdk_python.py URL KEY PREFIX

Each SDK runs as its users run it: the background consumer thread batches the calls to
/v1/batch (rudder-sdk-python gzips the body by default), then `flush()`. An unknown key is then
sent in sync mode, where the SDK raises the server's error: it must be an APIError carrying the
status and the server's `message`, not a KeyError.
"""

import json
import sys

from rudderstack.analytics.client import Client as RudderClient
from segment.analytics.client import Client as SegmentClient

url, key, prefix = sys.argv[1:4]
report = {}
for name, client_class in [("segment", SegmentClient), ("rudder", RudderClient)]:
    errors = []
    client = client_class(
        key,
        host=url,
        max_retries=2,
        on_error=lambda error, batch: errors.append(repr(error)),
    )
    user = f"{prefix}-{name}-py"
    client.identify(
        user,
        {"email": f"{user}@Example.com", "plan": "pro"},
        context={"app": {"name": "sdk-test"}},
    )
    client.track(
        user,
        "Order Completed",
        {"total": 12.5},
        context={"locale": "fr-FR"},
        integrations={"All": True},
    )
    client.page(user, "Docs", "Home", {"path": "/docs"})
    client.screen(user, "App", "Main", {"from": "menu"})
    client.group(user, "g-1", {"name": "Acme"})
    client.alias(f"{user}-old", user)
    client.flush()

    refused = {}
    bad = client_class("no-such-key", host=url, sync_mode=True, gzip=False)
    try:
        bad.track(user, "Refused")
    except Exception as error:  # what the SDK raises is the point of the check
        refused = {
            "type": type(error).__name__,
            "status": getattr(error, "status", None),
            "message": getattr(error, "message", str(error)),
        }
    report[name] = {"user": user, "errors": errors, "refused": refused}
print(json.dumps(report), flush=True)
