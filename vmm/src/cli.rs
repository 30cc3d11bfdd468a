//! The `chapeau` command: parse, configure logging, run the VM, turn the outcome into an exit
//! status and one line on stderr.

use std::process::ExitCode;

use clap::Parser;
use devices::ExitReason;

/// Exit status for a configuration the user must fix.
const EXIT_BAD_CONFIG: u8 = 2;
/// Exit status when the VM could not be built or the guest crashed.
const EXIT_FAILURE: u8 = 1;

pub fn main() -> ExitCode {
    let cli = api::Cli::parse();
    crate::logger::init(
        cli.log_level
            .as_str()
            .parse()
            .unwrap_or(log::LevelFilter::Warn),
    );
    let config = match cli.vm_config() {
        Ok(config) => config,
        Err(e) => {
            eprintln!("chapeau: {e}");
            return ExitCode::from(EXIT_BAD_CONFIG);
        }
    };
    match crate::run_vm(&config) {
        Ok(ExitReason::Crashed) => {
            eprintln!("chapeau: the guest crashed");
            ExitCode::from(EXIT_FAILURE)
        }
        Ok(_) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("chapeau: {e}");
            ExitCode::from(EXIT_FAILURE)
        }
    }
}
