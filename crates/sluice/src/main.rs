//! `sluice`: the command line. Glue only; the work is in the library crates.

use clap::{Parser, Subcommand};

use sluice::admin::{KeysCommand, OrgsCommand, UsersCommand};
use sluice::bench::BenchArgs;
use sluice::config::{Config, ConfigArgs, DEFAULT_CONFIG_TOML, LogFormat};
use sluice::serve::Role;

/// jemalloc instead of glibc's malloc: ingest allocates many small, short-lived buffers across
/// threads, where glibc's malloc and free took 28% of `sluice api`'s CPU (BENCHMARKS.md).
/// jemalloc rather than mimalloc: with its background threads it returns freed pages on a timer
/// (`MALLOC_CONF`), so memory goes back after a load even when the process then idles; with
/// mimalloc a backlog left ~450 MB resident 30 s after it was processed, with jemalloc ~85 MB,
/// at the same throughput (BENCHMARKS.md, issue 19).
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// jemalloc's settings, read when it starts (`_RJEM_MALLOC_CONF` in the environment overrides
/// them): background threads purge freed pages; dirty pages go back to the system within about
/// a second of being freed, without the intermediate "muzzy" state (which keeps them counted in
/// RSS until the kernel needs them).
// jemalloc looks this symbol up by name; nothing in Rust reads or writes it.
#[allow(unsafe_code)]
#[unsafe(export_name = "_rjem_malloc_conf")]
pub static MALLOC_CONF: &[u8; 60] =
    b"background_thread:true,dirty_decay_ms:1000,muzzy_decay_ms:0\0";

#[derive(Debug, Parser)]
#[command(
    name = "sluice",
    version,
    about = "Self-hosted ingestion service for customer data"
)]
struct Cli {
    #[command(flatten)]
    config: ConfigArgs,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the API and the pipeline in one process (the default); all state on local disk
    /// unless backends are given by URL.
    Serve,
    /// Run only the HTTP API: requests are made durable in the shared log (needs --log kafka://).
    Api,
    /// Run only the pipeline: consume the shared log as a group member (needs --log kafka://).
    Ingest,
    /// Manage orgs.
    Orgs {
        #[command(subcommand)]
        command: OrgsCommand,
    },
    /// Manage API keys.
    Keys {
        #[command(subcommand)]
        command: KeysCommand,
    },
    /// Ban and unban users.
    Users {
        #[command(subcommand)]
        command: UsersCommand,
    },
    /// The API's spill buffer.
    Buffer {
        #[command(subcommand)]
        command: sluice::buffer::BufferCommand,
    },
    /// Inspect and re-inject dead letters.
    Dlq {
        #[command(subcommand)]
        command: sluice::dlq::DlqCommand,
    },
    /// Configuration helpers.
    Config {
        #[command(subcommand)]
        command: ConfigCommand,
    },
    /// Load-test a running sluice.
    Bench(BenchArgs),
}

#[derive(Debug, Subcommand)]
enum ConfigCommand {
    /// Print a fully commented default configuration file.
    Default,
    /// Check the configuration (defaults < --config file < SLUICE_* variables < flags) and
    /// print it resolved, secrets redacted; exit 2 if it is invalid.
    Check,
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    if let Some(Command::Config {
        command: ConfigCommand::Check,
    }) = &cli.command
    {
        return config_check(&cli.config);
    }
    // Resolved once, before logging starts (its format is a setting); an invalid configuration
    // is reported by the command that needs it, so `config default` and `bench` still run.
    let config = Config::resolve(&cli.config);
    let format = config.as_ref().map_or(LogFormat::Text, |c| c.log_format);
    init_logging(format);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli, config)) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// `sluice config check`: the resolved configuration as TOML on stdout, or the error and 2.
fn config_check(args: &ConfigArgs) -> std::process::ExitCode {
    let printed = Config::resolve(args).and_then(|config| {
        toml::to_string(&config).map_err(|e| anyhow::anyhow!("cannot print the configuration: {e}"))
    });
    match printed {
        Ok(text) => {
            print!("{text}");
            std::process::ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::from(2)
        }
    }
}

/// Log lines to stderr at `RUST_LOG`'s levels (default info), as text or one JSON object per
/// line whose `span`/`spans` carry the fields of the batch or request a line belongs to.
fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,fjall=warn,lsm_tree=warn"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        // Colors for a terminal only: a log file or a supervisor's journal gets plain text.
        LogFormat::Text => builder
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .init(),
        LogFormat::Json => builder
            .json()
            .with_current_span(true)
            .with_span_list(true)
            .init(),
    }
}

async fn run(cli: Cli, config: anyhow::Result<Config>) -> anyhow::Result<()> {
    let command = cli.command.unwrap_or(Command::Serve);
    if let Command::Config {
        command: ConfigCommand::Default,
    } = command
    {
        print!("{DEFAULT_CONFIG_TOML}");
        return Ok(());
    }
    if let Command::Bench(args) = command {
        return sluice::bench::run(args).await;
    }
    let config = config?;
    match command {
        Command::Serve => sluice::serve::run(config, Role::Serve).await,
        Command::Api => sluice::serve::run(config, Role::Api).await,
        Command::Ingest => sluice::serve::run(config, Role::Ingest).await,
        Command::Orgs { command } => sluice::admin::orgs(&config, command).await,
        Command::Keys { command } => sluice::admin::keys(&config, command).await,
        Command::Users { command } => sluice::admin::users(&config, command).await,
        Command::Buffer { command } => sluice::buffer::run(&config, command).await,
        Command::Dlq { command } => sluice::dlq::run(&config, command).await,
        // Handled above.
        Command::Config { .. } | Command::Bench(_) => Ok(()),
    }
}
