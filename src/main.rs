//! `abox`: parse, set up logging and signals, run, report the error once.

use clap::Parser;

/// Whether the command line asks for `--progress json` (read before clap has parsed it, for
/// clap's own errors).
fn wants_json(args: &[std::ffi::OsString]) -> bool {
    args.iter()
        .zip(args.iter().skip(1).map(Some).chain([None]))
        .any(|(a, next)| {
            a == "--progress=json" || (a == "--progress" && next.is_some_and(|n| n == "json"))
        })
}

fn main() {
    let args: Vec<std::ffi::OsString> = std::env::args_os().collect();
    let cli = match alpine_boxes::cli::Cli::try_parse_from(&args) {
        Ok(c) => c,
        // A usage error is the last event too in JSON mode; help and --version print as usual.
        Err(e) if wants_json(&args) && e.use_stderr() => {
            let code = e.exit_code();
            alpine_boxes::progress::Progress::new(alpine_boxes::progress::Mode::Json)
                .error(e.render().to_string().trim_end(), code);
            std::process::exit(code);
        }
        Err(e) => e.exit(),
    };
    let level = match (cli.log_level, cli.verbose) {
        (Some(l), _) => l.as_str().to_ascii_lowercase(),
        (None, 0) => "warn".into(),
        (None, 1) => "debug".into(),
        _ => "trace".into(),
    };
    // The HTTP and gRPC libraries log whole request URLs at debug level, build arguments
    // (proxy credentials) included: they stay at info unless RUST_LOG asks for more.
    let filter = if std::env::var_os("RUST_LOG").is_some() {
        None
    } else {
        Some(format!(
            "{level},bollard=info,hyper=info,hyper_util=info,h2=info,tonic=info,tower=info,rustls=info"
        ))
    };
    let mut logger = env_logger::Builder::from_env(env_logger::Env::default());
    if let Some(f) = filter {
        logger.parse_filters(&f);
    }
    logger.format_target(false).init();
    if let Err(e) = alpine_boxes::signals::install() {
        eprintln!("error: installing signal handlers: {e:#}");
        std::process::exit(1);
    }
    let progress = alpine_boxes::progress::Progress::new(cli.progress);
    if let Err(e) = alpine_boxes::cli::run(cli) {
        // After Ctrl-C or SIGTERM, whatever failed on the way out (a layer read cut short, a
        // child killed by the same signal) is a consequence, not the news.
        if alpine_boxes::signals::interrupted() || e.chain().any(|c| c.to_string() == "interrupted")
        {
            progress.error("interrupted", 130);
            std::process::exit(130);
        }
        progress.error(&format!("{e:#}"), 1);
        std::process::exit(1);
    }
}
