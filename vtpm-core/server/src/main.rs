//! `vtpm-server` binary: see [`vtpm_server::cli`] for the options.

use std::process::ExitCode;

fn main() -> ExitCode {
    let options = match vtpm_server::cli::parse(std::env::args().skip(1)) {
        Ok(o) => o,
        Err(e) => {
            eprintln!("vtpm-server: {e}");
            return ExitCode::from(2);
        }
    };
    match run(options) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("vtpm-server: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run(options: vtpm_server::cli::Options) -> std::io::Result<()> {
    use vtpm_server::engine::VtpmEngine;
    use vtpm_server::server::Server;
    let server = Server::<VtpmEngine>::bind(&options.config)?;
    if let Some(pid) = &options.pid_file {
        std::fs::write(pid, format!("{}\n", std::process::id()))?;
    }
    eprintln!(
        "vtpm-server: TPM 1.2 in {}, commands on {}, control on {}",
        options.config.state_dir.display(),
        server.command_addr(),
        server.control_addr()
    );
    server.run()
}
