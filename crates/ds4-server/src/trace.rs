//! `--trace FILE`: a human-readable log of every request (raw JSON, rendered prompt, cache
//! decision, generated text as it streams, parsed result). Unbuffered, like ds4's.

use std::fs::File;
use std::io::Write;
use std::path::Path;
use std::sync::Mutex;

/// The trace file.
#[derive(Debug)]
pub struct Tracer {
    file: Mutex<File>,
}

impl Tracer {
    pub fn create(path: &Path) -> std::io::Result<Tracer> {
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)?;
        Ok(Tracer {
            file: Mutex::new(file),
        })
    }

    /// Append text (errors are ignored: tracing never fails a request).
    pub fn write(&self, s: &str) {
        if let Ok(mut f) = self.file.lock() {
            let _ = f.write_all(s.as_bytes());
        }
    }
}

/// `MMDD HH:MM:SS` in UTC.
pub fn timestamp() -> String {
    let secs = crate::ids::unix_now();
    let days = secs / 86400;
    let rem = secs % 86400;
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    format!(
        "{m:02}{d:02} {:02}:{:02}:{:02}",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}
