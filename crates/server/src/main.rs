//! `qwen-ocr`: the command-line entry point.

use std::io::IsTerminal;
use std::process::ExitCode;

use clap::Parser;
use qwen_ocr_server::cli;

fn main() -> ExitCode {
    qwen_ocr_model::kernels::threads::pin_cpu_thread_count();
    let args = match cli::Cli::try_parse() {
        Ok(args) => args,
        // --help and --version print as clap writes them.
        Err(e) if !e.use_stderr() => e.exit(),
        Err(e) => {
            // A bad flag value is an error like any other: one line, status 1.
            let message = e.to_string();
            let words: Vec<&str> = message.split_whitespace().collect();
            eprintln!("error: {}", words.join(" ").trim_start_matches("error: "));
            return ExitCode::FAILURE;
        }
    };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| args.default_log_level().into());
    let logs = tracing_subscriber::fmt().with_writer(std::io::stderr).with_env_filter(filter);
    // JSON lines for log collectors; plain text (coloured on a terminal) otherwise.
    if std::env::var("QWEN_OCR_LOG_FORMAT").is_ok_and(|f| f == "json") {
        logs.json().init();
    } else {
        logs.with_ansi(std::io::stderr().is_terminal()).init();
    }
    match cli::run(args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // One line, no backtrace: scripts read it.
            eprintln!("error: {}", format!("{e:#}").replace('\n', " "));
            ExitCode::FAILURE
        }
    }
}
