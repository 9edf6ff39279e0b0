//! The `slotgate` binary: parse flags, load and validate the configuration, run.

#![forbid(unsafe_code)]

use clap::Parser;
use slotgate::config::Cli;

fn main() {
    let cli = Cli::parse();
    let settings = match cli.settings() {
        Ok(s) => s,
        Err(e) => {
            eprintln!("slotgate: {e}");
            std::process::exit(1);
        }
    };
    if cli.check_config {
        println!(
            "configuration OK: listen {}, {} shard(s), {} worker(s), op timeout {:?}",
            settings
                .listen
                .map_or_else(|| "none".to_string(), |a| a.to_string()),
            settings.shards.len(),
            settings.workers,
            settings.op_timeout
        );
        return;
    }
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new(&settings.log_level))
        .with_writer(std::io::stderr)
        .init();
    if let Err(e) = slotgate::server::run(settings) {
        eprintln!("slotgate: {e}");
        std::process::exit(1);
    }
}
