//! A minimal `log` backend: one line per record on stderr (or the file `PUT /logger` names),
//! prefixed with the thread name, and rate-limited per call site, so no line a guest can
//! trigger — ours or a library's (virtio-queue logs every bad value its setters see) — can
//! flood the host's log.

use std::fs::File;
use std::hash::{Hash, Hasher};
use std::io::Write;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use log::{LevelFilter, Log, Metadata, Record};

/// Lines a call site may write in a burst before it is held to the refill rate.
pub const BURST: u32 = 10;
/// One more line per site per this period once the burst is spent.
pub const REFILL_PERIOD: Duration = Duration::from_secs(1);
/// Call sites tracked apart. Sites whose hash falls in the same slot share one budget, so the
/// table (and the log volume) stays bounded whatever the number of sites.
const SITE_SLOTS: usize = 256;

/// A token bucket for the call sites hashed to one slot.
#[derive(Clone, Copy)]
struct Bucket {
    tokens: u32,
    /// When the bucket was last refilled; `None` until the slot is first used.
    refilled: Option<Instant>,
    /// Lines dropped since the slot last wrote one.
    suppressed: u64,
}

const FULL: Bucket = Bucket {
    tokens: BURST,
    refilled: None,
    suppressed: 0,
};

/// Per-site token buckets in a fixed-size table.
pub struct SiteLimiter {
    slots: Mutex<[Bucket; SITE_SLOTS]>,
}

impl SiteLimiter {
    pub const fn new() -> Self {
        Self {
            slots: Mutex::new([FULL; SITE_SLOTS]),
        }
    }

    /// Whether a line from `site` may be written at `now`; `Some(k)` with the number of lines
    /// from that slot dropped since its last written one.
    pub fn admit(&self, site: u64, now: Instant) -> Option<u64> {
        let mut slots = self.slots.lock().unwrap_or_else(|p| p.into_inner());
        let bucket = &mut slots[(site % SITE_SLOTS as u64) as usize];
        let since = *bucket.refilled.get_or_insert(now);
        let periods = now.saturating_duration_since(since).as_nanos() / REFILL_PERIOD.as_nanos();
        if periods > 0 {
            let periods = u32::try_from(periods).unwrap_or(u32::MAX);
            bucket.tokens = bucket.tokens.saturating_add(periods).min(BURST);
            bucket.refilled = Some(now);
        }
        if bucket.tokens == 0 {
            bucket.suppressed = bucket.suppressed.saturating_add(1);
            return None;
        }
        bucket.tokens -= 1;
        Some(std::mem::take(&mut bucket.suppressed))
    }
}

impl Default for SiteLimiter {
    fn default() -> Self {
        Self::new()
    }
}

/// The call site of a record: its file and line (module path for records without a file).
fn site_of(record: &Record) -> u64 {
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    record.file().unwrap_or(record.target()).hash(&mut hasher);
    record.line().hash(&mut hasher);
    hasher.finish()
}

/// The line written for `record`, or None when its site is over its budget.
fn format_record(limiter: &SiteLimiter, record: &Record, now: Instant) -> Option<String> {
    let suppressed = limiter.admit(site_of(record), now)?;
    let thread = std::thread::current();
    // std keeps calling the main thread "main"; in chapeau it is always the vmm thread.
    let name = match thread.name() {
        Some("main") | None => "vmm",
        Some(name) => name,
    };
    let note = if suppressed > 0 {
        format!(" ({suppressed} similar lines suppressed)")
    } else {
        String::new()
    };
    Some(format!(
        "chapeau[{}] {}: {}{note}\n",
        name,
        record.level(),
        record.args()
    ))
}

struct StderrLogger {
    limiter: SiteLimiter,
}

impl Log for StderrLogger {
    fn enabled(&self, metadata: &Metadata) -> bool {
        metadata.level() <= log::max_level()
    }

    fn log(&self, record: &Record) {
        if !self.enabled(record.metadata()) {
            return;
        }
        // Formatted first so the line reaches stderr in one write and never interleaves.
        if let Some(line) = format_record(&self.limiter, record, Instant::now()) {
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
    }

    fn flush(&self) {}
}

static LOGGER: StderrLogger = StderrLogger {
    limiter: SiteLimiter::new(),
};
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

#[cfg(test)]
mod tests {
    use super::*;

    fn warn_at(line: u32) -> Record<'static> {
        Record::builder()
            .args(format_args!("virtio queue with invalid size: 3"))
            .level(log::Level::Warn)
            .file_static(Some("virtio-queue/src/queue.rs"))
            .line(Some(line))
            .build()
    }

    #[test]
    fn a_flood_from_one_site_is_bounded() {
        let limiter = SiteLimiter::new();
        let start = Instant::now();
        let record = warn_at(368);
        // 100,000 lines over 10 seconds of (simulated) time.
        let lines: Vec<String> = (0..100_000u32)
            .filter_map(|i| {
                let now = start + Duration::from_micros(u64::from(i) * 100);
                format_record(&limiter, &record, now)
            })
            .collect();
        assert!(
            lines.len() <= BURST as usize + 10,
            "{} lines written",
            lines.len()
        );
        assert!(lines[0].ends_with("invalid size: 3\n"), "{}", lines[0]);
        // When the site resumes, the line says how many were dropped.
        let resumed = &lines[BURST as usize];
        assert!(resumed.contains("similar lines suppressed)"), "{resumed}");
        let total: u64 = lines
            .iter()
            .filter_map(|l| l.split(" (").nth(1))
            .filter_map(|n| n.split(' ').next()?.parse::<u64>().ok())
            .sum();
        // Lines dropped after the last written one are told when the site next writes.
        let accounted = total + lines.len() as u64;
        assert!((90_000..=100_000).contains(&accounted), "{accounted}");
    }

    #[test]
    fn sites_have_their_own_budget() {
        let limiter = SiteLimiter::new();
        let now = Instant::now();
        let flooded = warn_at(1);
        for _ in 0..1000 {
            let _ = format_record(&limiter, &flooded, now);
        }
        assert!(format_record(&limiter, &flooded, now).is_none());
        // Another site (a different line) still gets through.
        assert!(format_record(&limiter, &warn_at(2), now).is_some());
        // After a quiet second, the flooded site gets one line again.
        assert!(format_record(&limiter, &flooded, now + REFILL_PERIOD).is_some());
    }

    #[test]
    fn memory_is_bounded_by_the_table() {
        let limiter = SiteLimiter::new();
        let now = Instant::now();
        // Many distinct sites: the table does not grow, and the total stays bounded.
        let written = (0..100_000u32)
            .filter(|line| format_record(&limiter, &warn_at(*line), now).is_some())
            .count();
        assert!(written <= SITE_SLOTS * BURST as usize, "{written}");
    }
}
