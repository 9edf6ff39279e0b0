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
            "configuration OK: listen {}, TLS {}, {} shard(s), {} worker(s), op timeout {:?}, \
             {} user(s), authentication {}",
            settings
                .listen
                .map_or_else(|| "none".to_string(), |a| a.to_string()),
            settings
                .tls
                .as_ref()
                .map_or_else(|| "off".to_string(), |t| t.listen.to_string()),
            settings.shards.len(),
            settings.workers,
            settings.op_timeout,
            settings.users.len(),
            if settings.users.auth_required() {
                "required"
            } else {
                "off"
            }
        );
        return;
    }
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new(&settings.log_level))
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    if let Err(e) = slotgate::server::run(settings, prometheus) {
        eprintln!("slotgate: {e}");
        std::process::exit(1);
    }
}
