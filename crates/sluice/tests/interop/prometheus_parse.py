"""Parses Prometheus text exposition from stdin with the official Python client's parser
(prometheus-client, PyPI) and prints one JSON object per family: name, type, and its samples
(name, labels, value). A format error is a traceback and exit 1."""
import json
import sys

from prometheus_client.parser import text_string_to_metric_families

families = []
for family in text_string_to_metric_families(sys.stdin.read()):
    families.append(
        {
            "name": family.name,
            "type": family.type,
            "help": family.documentation,
            "samples": [
                {"name": s.name, "labels": s.labels, "value": s.value}
                for s in family.samples
            ],
        }
    )
json.dump(families, sys.stdout)
