//! A PostgreSQL schema of a test's own on the test run's server, dropped on drop. Behind the
//! `testing` feature, for this and other crates' tests.
//!
//! `scripts/test` starts that server (see `scripts/services`) and names it in
//! `SLUICE_TEST_POSTGRES`; without it, the machine's own server at
//! `postgres://postgres@127.0.0.1:5432/test` is used.

use std::process::Command;
use std::sync::LazyLock;

/// The test run's database: `SLUICE_TEST_POSTGRES`, or the machine's default.
pub fn postgres_url() -> &'static str {
    static URL: LazyLock<String> = LazyLock::new(|| {
        std::env::var("SLUICE_TEST_POSTGRES")
            .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".to_string())
    });
    &URL
}

/// A schema created for one test.
pub struct Schema(String);

impl Schema {
    /// Creates `sluice_test_<pid>_<nanos>`. Panics (it is for tests) if psql fails.
    pub fn create() -> Schema {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        let name = format!("sluice_test_{}_{nanos}", std::process::id());
        psql(&format!("CREATE SCHEMA {name}"));
        Schema(name)
    }

    /// A registry URL whose connections use this schema.
    pub fn url(&self) -> String {
        format!("{}?options=-c%20search_path%3D{}", postgres_url(), self.0)
    }
}

impl Drop for Schema {
    fn drop(&mut self) {
        psql(&format!("DROP SCHEMA IF EXISTS {} CASCADE", self.0));
    }
}

fn psql(sql: &str) {
    let out = Command::new("psql")
        .args([postgres_url(), "-v", "ON_ERROR_STOP=1", "-q", "-c", sql])
        .output()
        .expect("psql runs (scripts/services installs it)");
    assert!(
        out.status.success(),
        "{sql} on {}: {}",
        postgres_url(),
        String::from_utf8_lossy(&out.stderr)
    );
}
