//! Packaging (SPEC §9): the `Dockerfile`, `deploy/compose.yaml` and the Kubernetes manifests
//! under `deploy/k8s/`. Docker cannot run on this machine, so they are checked offline:
//! hadolint lints the Dockerfile, kubernetes-validate (both from PyPI, installed by
//! `scripts/install-test-tools`) checks every manifest against the Kubernetes schemas in strict
//! mode, `tests/interop/check_deploy.py` checks what the schemas cannot (probes on the port
//! sluice listens on, the static membership id, the secrets, compose's services and health
//! checks), and the ConfigMap's configuration goes through `sluice config check` itself.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use serde_json::Value;

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// A tool of the checkout's `.venv`.
fn venv_tool(name: &str) -> Command {
    let tool = root().join(".venv/bin").join(name);
    assert!(
        tool.exists(),
        "{} is missing: run ./scripts/test (scripts/install-test-tools installs it)",
        tool.display()
    );
    let mut command = Command::new(tool);
    command.current_dir(root());
    command
}

fn output(command: &mut Command) -> (bool, String) {
    let out = command.output().expect("the tool runs");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

#[test]
fn hadolint_finds_nothing_in_the_dockerfile_and_would_find_a_fault() {
    let (ok, said) = output(venv_tool("hadolint").arg("Dockerfile"));
    assert!(ok, "hadolint Dockerfile: {said}");

    // The lint is live: the same file running as root with a `cd` is refused.
    let dir = tempfile::tempdir().expect("tempdir");
    let faulty = std::fs::read_to_string(root().join("Dockerfile"))
        .expect("Dockerfile")
        .replace("USER 10001:10001", "USER root\nRUN cd /tmp && ls");
    let path = dir.path().join("Dockerfile");
    std::fs::write(&path, faulty).expect("write");
    let (ok, said) = output(venv_tool("hadolint").arg(&path));
    assert!(!ok, "hadolint accepted a faulty Dockerfile: {said}");
    assert!(said.contains("DL3002") && said.contains("DL3003"), "{said}");
}

#[test]
fn the_kubernetes_manifests_match_the_schemas_strictly() {
    let manifests: Vec<PathBuf> = std::fs::read_dir(root().join("deploy/k8s"))
        .expect("deploy/k8s")
        .map(|e| e.expect("entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    assert!(manifests.len() >= 3, "{manifests:?}");
    let (ok, said) = output(
        venv_tool("kubernetes-validate")
            .args(["--strict", "--kubernetes-version", "1.33.0"])
            .args(&manifests),
    );
    assert!(ok, "kubernetes-validate: {said}");
    for resource in [
        "deployment/sluice-api",
        "service/sluice-api",
        "horizontalpodautoscaler/sluice-api",
        "statefulset/sluice-ingest",
        "configmap/sluice-config",
        "secret/sluice-secrets",
    ] {
        assert!(
            said.contains(&format!("passed for resource {resource}")),
            "{resource}: {said}"
        );
    }

    // The validation is strict: a misspelt field is refused.
    let dir = tempfile::tempdir().expect("tempdir");
    let api = std::fs::read_to_string(root().join("deploy/k8s/api.yaml")).expect("api.yaml");
    let path = dir.path().join("api.yaml");
    std::fs::write(&path, api.replace("readinessProbe", "readynessProbe")).expect("write");
    let (ok, said) = output(venv_tool("kubernetes-validate").arg("--strict").arg(&path));
    assert!(!ok && said.contains("readynessProbe"), "{said}");
}

#[test]
fn the_deployments_probe_sluice_as_it_listens_and_their_config_passes_config_check() {
    let (ok, said) = output(
        venv_tool("python")
            .arg(root().join("crates/sluice/tests/interop/check_deploy.py"))
            .arg(root()),
    );
    assert!(ok, "check_deploy.py: {said}");
    let deploy: Value = serde_json::from_str(&said).expect("check_deploy.py prints JSON");

    // The ConfigMap's file, with the Secret's values as the pods get them, is a valid
    // configuration; config check prints it resolved, the password and token redacted.
    let dir = tempfile::tempdir().expect("tempdir");
    let config = dir.path().join("sluice.toml");
    std::fs::write(&config, deploy["config"].as_str().expect("config")).expect("write");
    let secret = &deploy["secret"];
    let out = Command::new(env!("CARGO_BIN_EXE_sluice"))
        .args(["config", "check", "--config"])
        .arg(&config)
        .env(
            "SLUICE_REGISTRY",
            secret["registry"].as_str().expect("registry"),
        )
        .env(
            "SLUICE_ADMIN_TOKEN",
            secret["admin-token"].as_str().expect("token"),
        )
        .env("SLUICE_SPILL_MAX_BYTES", "0")
        .output()
        .expect("sluice config check");
    let printed = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "config check of the ConfigMap: {}{printed}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        !printed.contains("change-me"),
        "secrets redacted: {printed}"
    );
    let resolved: toml::Table = toml::from_str(&printed).expect("config check prints TOML");
    assert!(
        resolved["log"]
            .as_str()
            .is_some_and(|l| l.starts_with("kafka://")),
        "{printed}"
    );
    assert!(
        resolved["registry"]
            .as_str()
            .is_some_and(|r| r.starts_with("postgres://")),
        "{printed}"
    );

    // Every pod may take its whole drain: the preStop pause, then shutdown_timeout.
    let shutdown = humantime::parse_duration(
        resolved["shutdown_timeout"]
            .as_str()
            .expect("shutdown_timeout"),
    )
    .expect("a duration");
    for pod in deploy["grace"].as_array().expect("grace") {
        let grace = Duration::from_secs(pod["grace"].as_u64().expect("grace"));
        let pause = Duration::from_secs(pod["pre_stop"].as_u64().expect("pre_stop"));
        assert!(
            grace > pause + shutdown,
            "{}: terminationGracePeriodSeconds {grace:?} must cover the preStop pause {pause:?} and shutdown_timeout {shutdown:?}",
            pod["workload"]
        );
    }
}
