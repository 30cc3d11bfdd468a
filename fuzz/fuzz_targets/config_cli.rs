//! The config file (JSON) and command-line parsers, and what turns them into a VM config.
#![no_main]

use api::{Cli, VmConfig};
use clap::Parser;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(config) = VmConfig::from_json(text) {
        let _ = config.validate();
    }
    // The same text as arguments, one per line. --config would read a file the input names.
    let args: Vec<&str> = text.lines().collect();
    if args
        .iter()
        .any(|a| a.contains("config") || a.starts_with("-c"))
    {
        return;
    }
    if let Ok(cli) = Cli::try_parse_from(std::iter::once("chapeau").chain(args)) {
        let _ = cli.vm_config();
    }
});
