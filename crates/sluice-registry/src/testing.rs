//! A PostgreSQL schema of a test's own on the machine's server (127.0.0.1:5432, user
//! `postgres`, database `test`), dropped on drop. Behind the `testing` feature, for this and
//! other crates' tests.

use std::process::Command;

/// The machine's test database.
pub const POSTGRES: &str = "postgres://postgres@127.0.0.1:5432/test";

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
        format!("{POSTGRES}?options=-c%20search_path%3D{}", self.0)
    }
}

impl Drop for Schema {
    fn drop(&mut self) {
        psql(&format!("DROP SCHEMA IF EXISTS {} CASCADE", self.0));
    }
}

fn psql(sql: &str) {
    let out = Command::new("psql")
        .args([POSTGRES, "-v", "ON_ERROR_STOP=1", "-q", "-c", sql])
        .output()
        .expect("psql runs");
    assert!(
        out.status.success(),
        "{sql}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}
