"""Posts a body larger than the server's limit the way Python's HTTP clients do: the whole
body is sent before the answer is read (tests/api.rs runs it).

Usage: python early_error.py CLIENT URL KEY BYTES [ENCODING]
CLIENT is `urllib` or `requests`. Prints one JSON line: {"status": N, "body": {...}} when an
HTTP answer came back, or {"error": "..."} when the connection broke first.
"""

import json
import sys

client, url, key, size = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
encoding = sys.argv[5] if len(sys.argv) > 5 else None
item = b'{"userId":"u","eventName":"e"},'
body = b'{"events":[' + item * (size // len(item)) + b'{"userId":"u","eventName":"e"}]}'
headers = {"Api-Key": key, "Content-Type": "application/json"}
if encoding:
    headers["Content-Encoding"] = encoding

try:
    if client == "urllib":
        import urllib.error
        import urllib.request

        request = urllib.request.Request(url, data=body, headers=headers)
        try:
            with urllib.request.urlopen(request, timeout=30) as answer:
                status, text = answer.status, answer.read()
        except urllib.error.HTTPError as e:
            status, text = e.code, e.read()
    else:
        import requests

        answer = requests.post(url, data=body, headers=headers, timeout=30)
        status, text = answer.status_code, answer.content
    print(json.dumps({"status": status, "body": json.loads(text)}))
except Exception as e:  # the connection broke before an answer
    print(json.dumps({"error": f"{type(e).__name__}: {e}"}))
