//! A minimal `log` backend: one line per record on stderr (or the file `PUT /logger` names),
//! prefixed with the thread name.

use std::fs::File;
use std::io::Write;
use std::sync::Mutex;

use log::{LevelFilter, Log, Metadata, Record};

struct StderrLogger;

impl Log for StderrLogger {
    fn enabled(&self, metadata: &Metadata) -> bool {
        metadata.level() <= log::max_level()
    }

    fn log(&self, record: &Record) {
        if !self.enabled(record.metadata()) {
            return;
        }
        let thread = std::thread::current();
        // std keeps calling the main thread "main"; in chapeau it is always the vmm thread.
        let name = match thread.name() {
            Some("main") | None => "vmm",
            Some(name) => name,
        };
        // Formatted first so the line reaches stderr in one write and never interleaves.
        let line = format!("chapeau[{}] {}: {}\n", name, record.level(), record.args());
        let mut file = OUTPUT.lock().unwrap_or_else(|p| p.into_inner());
        match file.as_mut() {
            Some(file) => {
                let _ = file.write_all(line.as_bytes());
            }
            None => {
                let _ = std::io::stderr().lock().write_all(line.as_bytes());
            }
        }
    }

    fn flush(&self) {}
}

static LOGGER: StderrLogger = StderrLogger;
/// A file the log goes to instead of stderr (`PUT /logger`).
static OUTPUT: Mutex<Option<File>> = Mutex::new(None);

/// Sends the log to `file` from now on.
pub fn set_output(file: File) {
    *OUTPUT.lock().unwrap_or_else(|p| p.into_inner()) = Some(file);
}

pub fn init(level: LevelFilter) {
    // Only fails when a logger is already set, which leaves logging working.
    let _ = log::set_logger(&LOGGER);
    log::set_max_level(level);
}
