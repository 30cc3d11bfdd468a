//! `chapeau` as the integration tests run it (see tests/Cargo.toml).

fn main() -> std::process::ExitCode {
    vmm::cli::main()
}
