//! The `chapeau` binary, built inside the tests package so integration tests can find it
//! through CARGO_BIN_EXE_chapeau.

fn main() -> std::process::ExitCode {
    vmm::cli::main()
}
