//! `sluice buffer status`: depth, size and age of the spill buffer (SPEC §7).
//!
//! The buffer is read from `<data_dir>/spill` when no server holds it; while a server runs on
//! that data dir the buffer is locked, and the numbers come from the server's `/readyz` (at
//! `--listen`), which is also where spill mode shows.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::Context;
use clap::Subcommand;
use sluice_log::LogError;
use sluice_spill::SpillStatus;

use crate::client::Connection;
use crate::config::Config;

#[derive(Debug, Subcommand)]
pub enum BufferCommand {
    /// Show whether the API is spilling, and the records, bytes and oldest age it holds.
    Status {
        /// Print the status as JSON.
        #[arg(long)]
        json: bool,
    },
}

pub async fn run(config: &Config, command: BufferCommand) -> anyhow::Result<()> {
    let BufferCommand::Status { json } = command;
    let dir = config.spill_path();
    let (status, source) = match sluice_spill::status_at(&dir, config.spill_max_bytes) {
        Ok(status) => (status, format!("read from {}", dir.display())),
        Err(LogError::Locked { .. }) => {
            let addr = server_addr(&config.listen)?;
            let status = from_server(addr).await.with_context(|| {
                format!(
                    "the spill buffer at {} is held by a running server, and that server did not answer at http://{addr}/readyz (pass its --listen address)",
                    dir.display()
                )
            })?;
            (status, format!("from the server at http://{addr}"))
        }
        Err(e) => {
            return Err(e)
                .with_context(|| format!("cannot read the spill buffer at {}", dir.display()));
        }
    };
    if json {
        println!("{}", serde_json::to_string_pretty(&status)?);
        return Ok(());
    }
    print!("{}", render(&status, &source));
    Ok(())
}

/// The address to reach a server listening on `listen` (an unspecified IP means this host).
fn server_addr(listen: &str) -> anyhow::Result<SocketAddr> {
    let mut addr: SocketAddr = listen
        .parse()
        .with_context(|| format!("listen = {listen:?} is not an IP address and port"))?;
    if addr.ip().is_unspecified() {
        addr.set_ip(std::net::Ipv4Addr::LOCALHOST.into());
    }
    Ok(addr)
}

async fn from_server(addr: SocketAddr) -> anyhow::Result<SpillStatus> {
    let reply = tokio::time::timeout(Duration::from_secs(5), async {
        let mut connection = Connection::connect(addr).await?;
        connection.get("/readyz", &[]).await
    })
    .await
    .context("no answer within 5s")??;
    let body = reply.json();
    serde_json::from_value(body["spill"].clone()).with_context(|| {
        format!(
            "the answer to /readyz has no spill status (status {}): {}",
            reply.status,
            String::from_utf8_lossy(&reply.body)
        )
    })
}

fn render(status: &SpillStatus, source: &str) -> String {
    let mode = match (status.max_bytes, status.spilling) {
        (0, _) => "disabled (spill_max_bytes = 0)",
        (_, true) => "spilling: new messages go to the buffer, the replayer drains it",
        (_, false) => "direct: messages go to the log",
    };
    let oldest = status.oldest_age().map_or_else(
        || "-".to_string(),
        |age| {
            format!(
                "{} ago",
                humantime::format_duration(Duration::from_secs(age.as_secs()))
            )
        },
    );
    format!(
        "spill buffer ({source})\n  mode:    {mode}\n  records: {}\n  bytes:   {} of {}\n  oldest:  {oldest}\n",
        status.records, status.bytes, status.max_bytes
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listen_addresses_become_reachable_addresses() {
        assert_eq!(
            server_addr("0.0.0.0:9000").expect("addr").to_string(),
            "127.0.0.1:9000"
        );
        assert_eq!(
            server_addr("127.0.0.2:1").expect("addr").to_string(),
            "127.0.0.2:1"
        );
        assert!(server_addr("localhost:80").is_err());
    }

    #[test]
    fn status_reads_as_text() {
        let status = SpillStatus {
            spilling: true,
            records: 3,
            bytes: 300,
            max_bytes: 1000,
            oldest_age_ms: Some(61_500),
            ..SpillStatus::default()
        };
        let text = render(&status, "read from x");
        assert!(text.contains("mode:    spilling"), "{text}");
        assert!(text.contains("records: 3"), "{text}");
        assert!(text.contains("bytes:   300 of 1000"), "{text}");
        assert!(text.contains("oldest:  1m 1s ago"), "{text}");
    }
}
