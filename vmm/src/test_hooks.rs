//! Test-only hooks, compiled in only with the `forbidden-syscall-test` feature (a release build
//! without it has none of this code): they make chapeau do what no correct chapeau does, so
//! the integration tests can show that seccomp and Landlock stop it.
//!
//! - `CHAPEAU_TEST_FORBIDDEN_SYSCALL=<category>`: a thread of that category (`api`, `vmm`,
//!   `vcpu`, ...) makes getppid(2), which no policy allows, right after its filter is in force.
//! - `CHAPEAU_TEST_OPEN_AFTER_START=<path>`: once the VM runs, the `vmm` thread tries to open
//!   that host file for reading and logs the outcome.

use std::sync::OnceLock;

struct Hooks {
    forbidden_syscall: Option<String>,
    open_after_start: Option<std::path::PathBuf>,
}

static HOOKS: OnceLock<Hooks> = OnceLock::new();

/// Reads the hooks' environment; called before any filter is installed (a filtered thread
/// may read memory, but the lock of the environment is the process's, not the thread's).
pub fn init() {
    HOOKS.get_or_init(|| Hooks {
        forbidden_syscall: std::env::var("CHAPEAU_TEST_FORBIDDEN_SYSCALL").ok(),
        open_after_start: std::env::var_os("CHAPEAU_TEST_OPEN_AFTER_START").map(Into::into),
    });
}

/// Called by a thread of category `category` just after its filter was installed.
pub fn after_filter(category: &str) {
    let wanted = HOOKS.get().and_then(|h| h.forbidden_syscall.as_deref());
    if wanted == Some(category) {
        // SAFETY: getppid takes no arguments and touches no memory.
        let ppid = unsafe { libc::getppid() };
        // Reached only when the filter lets it through (`--seccomp log` or `off`).
        log::warn!("test hook: thread category {category} made getppid ({ppid}) and lives on");
    }
}

/// Called by the `vmm` thread once the VM runs, with its confinement in force.
pub fn after_start() {
    if let Some(path) = HOOKS.get().and_then(|h| h.open_after_start.as_deref()) {
        match std::fs::File::open(path) {
            Ok(_) => log::warn!("test hook: opened {} after start", path.display()),
            Err(e) => log::warn!("test hook: cannot open {} after start: {e}", path.display()),
        }
    }
}
