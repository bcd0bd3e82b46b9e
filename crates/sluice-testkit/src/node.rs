//! One engine node: a `scripts/engine <kind>-node` process and the JVM it runs.

use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::time::{Duration, Instant};

/// A running node. Its JVM is killed when this drops or the test process exits.
pub(crate) struct Node {
    name: String,
    args: Vec<String>,
    dir: PathBuf,
    running: Option<Running>,
}

struct Running {
    script: Child,
    /// Held open: the script kills the JVM when it closes.
    _stdin: ChildStdin,
    jvm: u32,
}

impl Node {
    /// Starts `scripts/engine <args>`; `dir` is the node's dir (its `engine.log` is shown when
    /// something fails).
    pub(crate) fn start(name: &str, args: Vec<String>, dir: &Path) -> Node {
        let mut node = Node {
            name: name.to_string(),
            args,
            dir: dir.to_path_buf(),
            running: None,
        };
        node.spawn();
        node
    }

    fn spawn(&mut self) {
        assert!(self.running.is_none(), "{} is running already", self.name);
        let mut script = Command::new(crate::engine_script())
            .args(&self.args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("{}: cannot run scripts/engine: {e}", self.name));
        let stdin = script.stdin.take().expect("piped stdin");
        let stdout = script.stdout.take().expect("piped stdout");
        let mut first = String::new();
        let _ = BufReader::new(stdout).read_line(&mut first);
        let Some(jvm) = first
            .strip_prefix("pid ")
            .and_then(|p| p.trim().parse::<u32>().ok())
        else {
            let _ = script.wait();
            let mut err = String::new();
            if let Some(mut stderr) = script.stderr.take() {
                let _ = stderr.read_to_string(&mut err);
            }
            panic!(
                "{}: scripts/engine {} did not start it: {}{}",
                self.name,
                self.args.join(" "),
                err.trim(),
                self.log_tail()
            );
        };
        self.running = Some(Running {
            script,
            _stdin: stdin,
            jvm,
        });
    }

    /// The JVM's process id, while it runs.
    pub(crate) fn pid(&self) -> Option<u32> {
        self.running.as_ref().map(|r| r.jvm)
    }

    /// Whether the JVM still runs (not killed, not exited).
    pub(crate) fn alive(&mut self) -> bool {
        match &mut self.running {
            Some(r) => matches!(r.script.try_wait(), Ok(None)),
            None => false,
        }
    }

    /// Panics with the engine's log unless the JVM still runs.
    pub(crate) fn assert_alive(&mut self, waiting_for: &str) {
        if !self.alive() {
            panic!(
                "{} exited while waiting for {waiting_for}{}",
                self.name,
                self.log_tail()
            );
        }
    }

    fn signal(&self, signal: &str) {
        if let Some(pid) = self.pid() {
            let status = Command::new("kill")
                .args([signal, &pid.to_string()])
                .status()
                .expect("kill runs");
            assert!(status.success(), "kill {signal} {pid} ({})", self.name);
        }
    }

    /// SIGKILL, and waits until it is gone.
    pub(crate) fn kill(&mut self) {
        self.signal("-KILL");
        self.reap();
    }

    /// SIGTERM (a clean shutdown), and waits until it is gone.
    pub(crate) fn terminate(&mut self) {
        self.signal("-CONT");
        self.signal("-TERM");
        self.reap();
    }

    /// SIGSTOP: the JVM stays, answering nothing.
    pub(crate) fn freeze(&self) {
        self.signal("-STOP");
    }

    /// SIGCONT after `freeze`.
    pub(crate) fn thaw(&self) {
        self.signal("-CONT");
    }

    /// Starts the node again on the same dir (after `kill` or `terminate`).
    pub(crate) fn restart(&mut self) {
        if self.running.is_some() {
            self.kill();
        }
        self.spawn();
    }

    fn reap(&mut self) {
        if let Some(mut r) = self.running.take() {
            let _ = r.script.wait();
        }
    }

    /// The last lines of the node's `engine.log`, for panic messages.
    pub(crate) fn log_tail(&self) -> String {
        let log = self.dir.join("engine.log");
        match std::fs::read_to_string(&log) {
            Ok(text) => {
                let lines: Vec<&str> = text.lines().collect();
                let tail = lines[lines.len().saturating_sub(40)..].join("\n");
                format!("\n--- {} ---\n{tail}", log.display())
            }
            Err(e) => format!(" (no log at {}: {e})", log.display()),
        }
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        self.signal("-KILL");
        self.reap();
    }
}

/// Polls `ready` every 100 ms until it holds; panics with `what` after `timeout`.
pub(crate) fn wait_until(
    timeout: Duration,
    mut ready: impl FnMut() -> bool,
    mut on_timeout: impl FnMut() -> String,
) {
    let deadline = Instant::now() + timeout;
    while !ready() {
        if Instant::now() > deadline {
            panic!("{}", on_timeout());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}
