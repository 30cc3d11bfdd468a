//! `chapeau-jailer`: see jailer/README.md.

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    let args = jailer::cli::Args::parse();
    match jailer::run(&args) {
        Ok(status) => ExitCode::from(u8::try_from(status).unwrap_or(1)),
        Err(e) => {
            eprintln!("chapeau-jailer: {e}");
            ExitCode::FAILURE
        }
    }
}
