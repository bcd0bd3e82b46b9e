//! Admin commands on the registry: `orgs`, `keys`, `users`. They open the same registry as the
//! server (SQLite in WAL mode), so they work while it runs.

use anyhow::Context;
use clap::Subcommand;
use sluice_registry::{KeyScope, Registry};

use crate::config::Config;

#[derive(Debug, Subcommand)]
pub enum OrgsCommand {
    /// Create an org.
    Create { name: String },
    /// List orgs.
    List,
    /// Disable an org: its keys stop working and its messages are refused.
    Disable { name: String },
    /// Enable a disabled org again.
    Enable { name: String },
    /// Require SendGrid Event Webhook signatures for an org: KEY is the verification key
    /// SendGrid shows (base64 of an ECDSA P-256 public key). `--clear` stops checking.
    SetSendgridKey {
        name: String,
        #[arg(required_unless_present = "clear")]
        key: Option<String>,
        #[arg(long, conflicts_with = "key")]
        clear: bool,
    },
    /// Set an org's rate limit: messages per second (0: unlimited) and the burst above it
    /// (default: one second's worth), per API node. `--clear`: the server's
    /// org_events_per_second applies again.
    SetLimit {
        name: String,
        #[arg(long, required_unless_present = "clear", value_name = "N")]
        events_per_second: Option<u32>,
        #[arg(long, value_name = "M", requires = "events_per_second")]
        burst: Option<u32>,
        #[arg(long, conflicts_with = "events_per_second")]
        clear: bool,
    },
}

#[derive(Debug, Subcommand)]
pub enum KeysCommand {
    /// Create an API key for an org and print it (only the key, on stdout). A `write` key only
    /// ingests (the key for web pages and SDKs), a `read` key only reads and searches.
    Create {
        #[arg(long)]
        org: String,
        /// full, write or read.
        #[arg(long, default_value = "full", value_parser = parse_scope)]
        scope: KeyScope,
    },
    /// List an org's keys: id, scope, creation time and the key's first characters (never
    /// the key).
    List {
        #[arg(long)]
        org: String,
        /// One JSON object per key.
        #[arg(long)]
        json: bool,
    },
    /// Revoke a key by its id (as `keys list` shows it; 8 hex digits of it are enough). It
    /// stops working on every node within key_cache_ttl.
    Revoke {
        #[arg(value_name = "KEY_ID")]
        id: String,
    },
}

fn parse_scope(text: &str) -> Result<KeyScope, String> {
    text.parse()
}

#[derive(Debug, Subcommand)]
pub enum UsersCommand {
    /// Ban a user: their messages are dead-lettered by the pipeline.
    Ban {
        #[arg(long)]
        org: String,
        user_id: String,
    },
    /// Lift a ban.
    Unban {
        #[arg(long)]
        org: String,
        user_id: String,
    },
    /// Forget a user (GDPR erasure): a user_delete message goes into the log, and the pipeline
    /// removes the profile and every event of the user, in order with its other messages.
    Forget {
        #[arg(long)]
        org: String,
        /// The user's id (with --by-email: the user's email).
        user: String,
        /// USER is an email: forgets what was written under that email.
        #[arg(long)]
        by_email: bool,
    },
}

async fn open(config: &Config) -> anyhow::Result<Box<dyn Registry>> {
    crate::backends::open_registry(config).await
}

pub async fn orgs(config: &Config, command: OrgsCommand) -> anyhow::Result<()> {
    let registry = open(config).await?;
    match command {
        OrgsCommand::Create { name } => {
            registry.create_org(&name).await?;
            println!("created org {name:?}; create a key with: sluice keys create --org {name}");
        }
        OrgsCommand::List => {
            let orgs = registry.list_orgs().await?;
            println!("{:<32} {:<8} created", "name", "status");
            for org in orgs {
                let status = if org.active { "active" } else { "disabled" };
                println!(
                    "{:<32} {:<8} {}",
                    org.name,
                    status,
                    format_unix(org.created_at)
                );
            }
        }
        OrgsCommand::Disable { name } => {
            registry.set_org_active(&name, false).await?;
            println!("disabled org {name:?}");
        }
        OrgsCommand::Enable { name } => {
            registry.set_org_active(&name, true).await?;
            println!("enabled org {name:?}");
        }
        OrgsCommand::SetLimit {
            name,
            events_per_second,
            burst,
            ..
        } => {
            let limit = events_per_second.map(|per_second| sluice_registry::RateLimit {
                per_second,
                burst: burst.unwrap_or(per_second),
            });
            registry.set_org_limit(&name, limit).await?;
            match limit {
                Some(l) if l.per_second > 0 => println!(
                    "org {name:?} may send {} messages per second (burst {}) on each API node, from its next key lookup (within key_cache_ttl)",
                    l.per_second, l.burst
                ),
                Some(_) => println!("org {name:?} has no rate limit"),
                None => println!("org {name:?} follows the server's org_events_per_second again"),
            }
        }
        OrgsCommand::SetSendgridKey { name, key, .. } => match key {
            Some(key) => {
                let key = key.trim();
                sluice_api::sendgrid::parse_verification_key(key).map_err(anyhow::Error::msg)?;
                registry.set_sendgrid_key(&name, Some(key)).await?;
                println!(
                    "org {name:?} now requires SendGrid webhook signatures made with this key (within {} s of their timestamp)",
                    config.sendgrid_max_age.as_secs()
                );
            }
            None => {
                registry.set_sendgrid_key(&name, None).await?;
                println!("org {name:?} no longer checks SendGrid webhook signatures");
            }
        },
    }
    Ok(())
}

pub async fn keys(config: &Config, command: KeysCommand) -> anyhow::Result<()> {
    let registry = open(config).await?;
    match command {
        KeysCommand::Create { org, scope } => {
            let key = registry.create_scoped_key(&org, scope).await?;
            println!("{key}");
        }
        KeysCommand::List { org, json } => {
            let keys = registry.list_keys(&org).await?;
            if json {
                for key in &keys {
                    println!("{}", serde_json::to_string(key)?);
                }
            } else {
                println!("{:<12}  {:<5}  {:<20}  prefix", "id", "scope", "created");
                for key in &keys {
                    println!(
                        "{:<12}  {:<5}  {:<20}  {}…",
                        key.id,
                        key.scope,
                        sluice_model::time::format_ms(key.created_at.saturating_mul(1000)),
                        key.prefix
                    );
                }
            }
        }
        KeysCommand::Revoke { id } => {
            let (org, key) = registry.revoke_key(&id).await?;
            println!(
                "revoked key {} ({} scope, {}…) of org {org:?}; it stops working within key_cache_ttl ({} s)",
                key.id,
                key.scope,
                key.prefix,
                config.key_cache_ttl.as_secs()
            );
        }
    }
    Ok(())
}

pub async fn users(config: &Config, command: UsersCommand) -> anyhow::Result<()> {
    let registry = open(config).await?;
    match command {
        UsersCommand::Ban { org, user_id } => {
            registry.ban_user(&org, &user_id).await?;
            println!("banned user {user_id:?} in org {org:?}");
        }
        UsersCommand::Forget {
            org,
            user,
            by_email,
        } => {
            let found = registry.org(&org).await?;
            if found.is_none() {
                anyhow::bail!("no org {org:?}: see sluice orgs list");
            }
            let (user_id, email) = if by_email {
                (None, Some(user.as_str()))
            } else {
                (Some(user.as_str()), None)
            };
            let message = sluice_model::Message::forget(user_id, email)
                .map_err(|e| anyhow::anyhow!("cannot forget {user:?}: {e}"))?;
            let (key, value) = message
                .to_record(&org, sluice_model::time::now_ms())
                .map_err(|e| anyhow::anyhow!("{e}"))?;
            append_to_log(config, key, value).await?;
            println!(
                "forgetting user {user:?} of org {org:?}: message {} is in the log; the pipeline removes the profile and every event of the user",
                message.message_id
            );
        }
        UsersCommand::Unban { org, user_id } => {
            if registry.unban_user(&org, &user_id).await? {
                println!("unbanned user {user_id:?} in org {org:?}");
            } else {
                println!("user {user_id:?} was not banned in org {org:?}");
            }
        }
    }
    Ok(())
}

fn format_unix(secs: i64) -> String {
    humantime::format_rfc3339_seconds(
        std::time::UNIX_EPOCH + std::time::Duration::from_secs(secs.max(0) as u64),
    )
    .to_string()
}

/// Appends one record to the ingest log: directly, or through the admin socket of the server
/// that holds this data dir's embedded log.
async fn append_to_log(config: &Config, key: Vec<u8>, value: Vec<u8>) -> anyhow::Result<()> {
    match crate::backends::open_log(config, crate::backends::Connect::Now).await {
        Ok((log, retention)) => {
            if let Some(retention) = retention {
                retention.abort();
            }
            log.append(vec![sluice_log::Record {
                key,
                value,
                timestamp_ms: sluice_model::time::now_ms(),
            }])
            .await
            .context("cannot append to the log")?;
            log.close().await.context("cannot close the log")?;
            Ok(())
        }
        Err(e) if crate::backends::is_locked(&e) => {
            let socket = crate::admin_socket::path(config);
            if !socket.exists() {
                return Err(e.context(format!(
                    "a sluice server holds this data dir's log, and it has no admin socket at {}",
                    socket.display()
                )));
            }
            crate::admin_socket::append_at(&socket, &key, &value).await
        }
        Err(e) => Err(e),
    }
}
