//! `backplane`: the agent (`run`), its clients (`flows`, `status`, `explain`) and the
//! rule checker (`check`).

use clap::Parser as _;

fn main() -> std::process::ExitCode {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).init();
    let cli = backplane::cli::Cli::parse();
    if let backplane::cli::Command::Run(args) = &cli.command {
        // Before any thread exists: every thread of the agent inherits the kept set.
        let low_port = args.metrics_addr.as_deref().and_then(|a| a.parse::<std::net::SocketAddr>().ok());
        match backplane::privileges::drop_for_run(low_port.is_some_and(|a| a.port() < 1024)) {
            Ok(kept) => log::debug!("capabilities kept: {kept:?}"),
            Err(e) => {
                eprintln!("backplane: cannot drop the capabilities it does not need: {e}");
                return std::process::ExitCode::FAILURE;
            }
        }
    }
    if !matches!(cli.command, backplane::cli::Command::Run(_)) {
        // A client piped into `head` should end quietly, as other Unix tools do. The
        // agent keeps SIGPIPE ignored: a vanishing control client must not kill it.
        // SAFETY: setting a signal disposition to the default has no preconditions.
        unsafe { libc::signal(libc::SIGPIPE, libc::SIG_DFL) };
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("backplane: cannot start the async runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    match runtime.block_on(backplane::cli::dispatch(cli)) {
        Ok(code) => code,
        Err(e) => {
            // Error messages here already name their cause; add only causes they omit.
            eprintln!("backplane: {}", backplane::error::report(e.as_ref()));
            std::process::ExitCode::FAILURE
        }
    }
}
