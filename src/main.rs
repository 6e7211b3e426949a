//! `abox`: parse, set up logging and signals, run, report the error once.

use clap::Parser;

fn main() {
    let cli = alpine_boxes::cli::Cli::parse();
    let level = match (cli.log_level, cli.verbose) {
        (Some(l), _) => l.as_str().to_ascii_lowercase(),
        (None, 0) => "warn".into(),
        (None, 1) => "debug".into(),
        _ => "trace".into(),
    };
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or(&level))
        .format_target(false)
        .init();
    if let Err(e) = alpine_boxes::signals::install() {
        eprintln!("error: installing signal handlers: {e:#}");
        std::process::exit(1);
    }
    if let Err(e) = alpine_boxes::cli::run(cli) {
        eprintln!("error: {e:#}");
        let interrupted = e.chain().any(|c| c.to_string() == "interrupted");
        std::process::exit(if interrupted { 130 } else { 1 });
    }
}
