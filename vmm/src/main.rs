//! `chapeau`: boot a Linux guest on KVM from flags or a JSON config.

fn main() -> std::process::ExitCode {
    vmm::cli::main()
}
