//! The `slotgate` binary: parse flags, load and validate the configuration, run.

#![forbid(unsafe_code)]

use clap::Parser;
use slotgate::config::Cli;

/// jemalloc, configured at build time (`.cargo/config.toml`) to purge freed memory in a
/// background thread after about a second.
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

fn main() {
    slotgate::tls::install_default_provider();
    let cli = Cli::parse();
    // Before the settings: read-through rules register their metrics as they are built.
    let prometheus = slotgate::metrics::install();
    let settings = match cli.settings() {
        Ok(s) => s,
        Err(e) => {
            eprintln!("slotgate: {e}");
            std::process::exit(1);
        }
    };
    if cli.check_config {
        // A summary only: never a password.
        println!(
            "configuration OK: listen {}, TLS {}, {}, {} worker(s), op timeout {:?}, \
             {} user(s), authentication {}, {} token issuer(s) with {} key(s)",
            settings
                .listen
                .map_or_else(|| "none".to_string(), |a| a.to_string()),
            settings
                .tls
                .as_ref()
                .map_or_else(|| "off".to_string(), |t| t.listen.to_string()),
            match &settings.cluster {
                Some(c) => format!(
                    "cluster mode (seeds {}; the layout is read at start-up, then every {:?})",
                    c.seeds.join(", "),
                    c.refresh
                ),
                None => format!("{} shard(s)", settings.shards.len()),
            },
            settings.workers,
            settings.op_timeout,
            settings.users.len(),
            if settings.users.auth_required() {
                "required"
            } else {
                "off"
            },
            settings.tokens.len(),
            settings.tokens.key_count()
        );
        return;
    }
    // The log filter sits behind a reload handle: a configuration reload may change it.
    use tracing_subscriber::prelude::*;
    let (filter, filter_handle) = tracing_subscriber::reload::Layer::new(
        tracing_subscriber::EnvFilter::new(&settings.log_level),
    );
    tracing_subscriber::registry()
        .with(filter)
        .with(
            tracing_subscriber::fmt::layer()
                .with_writer(std::io::stderr)
                .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr())),
        )
        .init();
    // (The rules were built before the log existed: their warning is given now.)
    for rule in settings.readthrough.iter() {
        slotgate::readthrough::warn_if_insecure(rule);
    }
    let reloader = slotgate::reload::Reloader {
        read: Box::new(move || cli.settings().map_err(|e| e.to_string())),
        log_filter: Box::new(move |level| {
            let filter =
                tracing_subscriber::EnvFilter::try_new(level).map_err(|e| e.to_string())?;
            filter_handle.reload(filter).map_err(|e| e.to_string())
        }),
    };
    if let Err(e) = slotgate::server::run(settings, prometheus, reloader) {
        eprintln!("slotgate: {e}");
        std::process::exit(1);
    }
}
