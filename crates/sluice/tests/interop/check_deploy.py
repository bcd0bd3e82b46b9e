"""Checks what the schemas cannot about deploy/ (tests/packaging.rs runs it; PyYAML parses).

Usage: python check_deploy.py REPO_ROOT
Prints one JSON object: the ConfigMap's sluice.toml, the Secret's values and the longest
shutdown the pods allow for, for the Rust test to run `sluice config check` on. Exits 1 with
every problem found, one per line, when something is wrong.
"""

import json
import pathlib
import re
import sys

import yaml

root = pathlib.Path(sys.argv[1])
problems = []


def check(ok, what):
    if not ok:
        problems.append(what)


def env_of(container):
    return {e["name"]: e for e in container.get("env", [])}


# --- Kubernetes -----------------------------------------------------------------------------
docs = []
for path in sorted((root / "deploy" / "k8s").glob("*.yaml")):
    docs += [(path.name, d) for d in yaml.safe_load_all(path.read_text()) if d]
by_kind = {}
for name, doc in docs:
    by_kind.setdefault(doc["kind"], []).append(doc)

config_maps = [d for d in by_kind.get("ConfigMap", []) if d["metadata"]["name"] == "sluice-config"]
check(len(config_maps) == 1, "k8s: one ConfigMap sluice-config")
config_toml = config_maps[0]["data"]["sluice.toml"] if config_maps else ""
secrets = [d for d in by_kind.get("Secret", []) if d["metadata"]["name"] == "sluice-secrets"]
check(len(secrets) == 1, "k8s: one Secret sluice-secrets")
secret = secrets[0].get("stringData", {}) if secrets else {}
check("registry" in secret and "admin-token" in secret, "k8s: the Secret has registry and admin-token")

workloads = {}
for kind in ("Deployment", "StatefulSet"):
    for d in by_kind.get(kind, []):
        workloads[d["metadata"]["name"]] = d
api = workloads.get("sluice-api")
ingest = workloads.get("sluice-ingest")
check(api is not None and api["kind"] == "Deployment", "k8s: sluice-api is a Deployment")
check(ingest is not None and ingest["kind"] == "StatefulSet", "k8s: sluice-ingest is a StatefulSet")

grace = []
for workload, role, port in ((api, "api", 8080), (ingest, "ingest", 9101)):
    if workload is None:
        continue
    name = workload["metadata"]["name"]
    pod = workload["spec"]["template"]["spec"]
    labels = workload["spec"]["template"]["metadata"]["labels"]
    check(workload["spec"]["selector"]["matchLabels"].items() <= labels.items(), f"{name}: the selector matches the pod labels")
    (container,) = pod["containers"]
    check(container["args"][:1] == [role], f"{name}: runs `sluice {role}`")
    check("--config" in container["args"], f"{name}: reads the ConfigMap's file")
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    env = env_of(container)
    listen = env.get("SLUICE_LISTEN", {}).get("value") or re.search(r'^listen = "(.*)"', config_toml, re.M).group(1)
    check(listen.endswith(f":{port}") and listen.startswith("0.0.0.0:"), f"{name}: listens on 0.0.0.0:{port} ({listen})")
    for probe, path in (("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")):
        get = container.get(probe, {}).get("httpGet", {})
        check(get.get("path") == path, f"{name}: {probe} on {path}")
        check(ports.get(get.get("port")) == port, f"{name}: {probe} on the port sluice listens on")
    for var, key in (("SLUICE_REGISTRY", "registry"), ("SLUICE_ADMIN_TOKEN", "admin-token")):
        ref = env.get(var, {}).get("valueFrom", {}).get("secretKeyRef", {})
        check(ref.get("name") == "sluice-secrets" and ref.get("key") == key, f"{name}: {var} from the Secret")
    ctx = pod.get("securityContext", {})
    check(ctx.get("runAsNonRoot") is True and ctx.get("runAsUser") == 10001, f"{name}: runs as the image's non-root user")
    pre_stop = container.get("lifecycle", {}).get("preStop", {}).get("exec", {}).get("command", [])
    pause = int(pre_stop[1]) if pre_stop[:1] == ["sleep"] else 0
    grace.append({"workload": name, "grace": pod.get("terminationGracePeriodSeconds", 30), "pre_stop": pause})
    mounts = {m["mountPath"] for m in container.get("volumeMounts", [])}
    check("/var/lib/sluice" in mounts, f"{name}: the data dir is a volume (the root filesystem is read-only)")

if ingest is not None:
    instance = env_of(ingest["spec"]["template"]["spec"]["containers"][0]).get("SLUICE_KAFKA_INSTANCE_ID", {})
    check(
        instance.get("valueFrom", {}).get("fieldRef", {}).get("fieldPath") == "metadata.name",
        "sluice-ingest: each pod's static membership id is its stable name",
    )
    check(ingest["spec"].get("volumeClaimTemplates"), "sluice-ingest: a volume per pod")
services = {d["metadata"]["name"]: d for d in by_kind.get("Service", [])}
check(
    services.get("sluice-api", {}).get("spec", {}).get("selector", {}).get("app.kubernetes.io/component") == "api",
    "k8s: the sluice-api Service selects the api pods",
)
hpas = by_kind.get("HorizontalPodAutoscaler", [])
check(
    any(h["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "sluice-api"} for h in hpas),
    "k8s: a HorizontalPodAutoscaler scales sluice-api",
)

# --- Compose --------------------------------------------------------------------------------
compose = yaml.safe_load((root / "deploy" / "compose.yaml").read_text())
services = compose["services"]
for name in ("kafka", "opensearch", "redis", "postgres", "api-1", "api-2", "ingest-1", "ingest-2"):
    check(name in services, f"compose: service {name}")
    check("healthcheck" in services.get(name, {}), f"compose: {name} has a health check")
kafka_env = services.get("kafka", {}).get("environment", {})
check("controller" in kafka_env.get("KAFKA_PROCESS_ROLES", ""), "compose: Kafka runs in KRaft mode (a controller role, no ZooKeeper)")
check(not any("zookeeper" in n for n in services), "compose: no ZooKeeper")
ids = set()
for name in ("api-1", "api-2", "ingest-1", "ingest-2"):
    service = services.get(name, {})
    role = name.split("-")[0]
    check(service.get("command") == [role], f"compose: {name} runs `sluice {role}`")
    build = service.get("build", {})
    check((root / "deploy" / build.get("context", "") / build.get("dockerfile", "")).is_file(), f"compose: {name} builds the Dockerfile")
    env = service.get("environment", {})
    for var, scheme in (("SLUICE_LOG", "kafka://"), ("SLUICE_INDEX", "http"), ("SLUICE_DEDUP", "redis://"), ("SLUICE_REGISTRY", "postgres://")):
        check(str(env.get(var, "")).startswith(scheme), f"compose: {name} uses the shared {var}")
    port = env.get("SLUICE_LISTEN", "0.0.0.0:8080").rsplit(":", 1)[1]
    check(f":{port}/readyz" in " ".join(service.get("healthcheck", {}).get("test", [])), f"compose: {name}'s health check asks /readyz on its port")
    check(any(str(v).endswith(":/var/lib/sluice") for v in service.get("volumes", [])), f"compose: {name} keeps its data dir in a volume")
    if role == "ingest":
        ids.add(env.get("SLUICE_KAFKA_INSTANCE_ID"))
    deps = service.get("depends_on", {})
    check(all(deps.get(s, {}).get("condition") == "service_healthy" for s in ("kafka", "opensearch", "redis", "postgres")), f"compose: {name} waits for healthy backends")
check(len(ids) == 2 and None not in ids, "compose: the ingest nodes have distinct static membership ids")

# --- Dockerfile -----------------------------------------------------------------------------
dockerfile = (root / "Dockerfile").read_text()
stages = re.findall(r"^FROM\s+\S+", dockerfile, re.M)
check(len(stages) >= 2, "Dockerfile: multi-stage")
check("--locked" in dockerfile and "--release" in dockerfile, "Dockerfile: a release build with --locked")
user = re.findall(r"^USER\s+(\S+)", dockerfile, re.M)
check(user and user[-1].split(":")[0] not in ("0", "root"), "Dockerfile: runs as a non-root user")
check(re.search(r"^HEALTHCHECK .*\n?.*CMD .*/healthz", dockerfile, re.M), "Dockerfile: HEALTHCHECK on /healthz")
expose = re.findall(r"^EXPOSE\s+(\d+)", dockerfile, re.M)
listen = re.search(r"SLUICE_LISTEN=\S+:(\d+)", dockerfile)
check(expose and listen and expose[0] == listen.group(1), "Dockerfile: EXPOSEs the port SLUICE_LISTEN sets")
for ignored in ("target", ".venv"):
    check(ignored in (root / ".dockerignore").read_text().split(), f".dockerignore: {ignored}")

if problems:
    print("\n".join(problems), file=sys.stderr)
    sys.exit(1)
print(json.dumps({"config": config_toml, "secret": secret, "grace": grace}))
