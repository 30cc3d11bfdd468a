//! A minimal `log` backend: one line per record on stderr, prefixed with the thread name.

use std::io::Write;

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
        let _ = std::io::stderr().lock().write_all(line.as_bytes());
    }

    fn flush(&self) {}
}

static LOGGER: StderrLogger = StderrLogger;

pub fn init(level: LevelFilter) {
    // Only fails when a logger is already set, which leaves logging working.
    let _ = log::set_logger(&LOGGER);
    log::set_max_level(level);
}
