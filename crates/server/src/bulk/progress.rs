//! How far a bulk run is: a progress bar with pages per minute and an ETA on a terminal, one
//! plain line per finished item otherwise (logs, CI).

use std::io::IsTerminal;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressState, ProgressStyle};

use super::journal::{Line, Status};

pub struct Progress {
    /// On a terminal.
    bar: Option<ProgressBar>,
    started: Instant,
    total: AtomicU64,
    finished: AtomicU64,
    pub ok: AtomicU64,
    pub failed: AtomicU64,
}

impl Progress {
    pub fn new() -> Self {
        let bar = std::io::stderr().is_terminal().then(|| {
            let style = ProgressStyle::with_template("{bar:40.cyan/blue} {pos}/{len} pages  {per_min}  ETA {eta}  {msg}")
                .expect("a valid template")
                .with_key("per_min", |state: &ProgressState, w: &mut dyn std::fmt::Write| {
                    let _ = write!(w, "{:.1} pages/min", state.per_sec() * 60.0);
                });
            ProgressBar::new(0).with_style(style)
        });
        Self {
            bar,
            started: Instant::now(),
            total: AtomicU64::new(0),
            finished: AtomicU64::new(0),
            ok: AtomicU64::new(0),
            failed: AtomicU64::new(0),
        }
    }

    /// More items to read (found as the inputs are scanned).
    pub fn add(&self, items: u64) {
        self.total.fetch_add(items, Ordering::Relaxed);
        if let Some(bar) = &self.bar {
            bar.inc_length(items);
        }
    }

    /// One image or page finished.
    pub fn finished(&self, line: &Line) {
        let counter = if line.status == Status::Ok { &self.ok } else { &self.failed };
        counter.fetch_add(1, Ordering::Relaxed);
        let finished = self.finished.fetch_add(1, Ordering::Relaxed) + 1;
        let what = match line.page {
            Some(page) => format!("{} page {page}", line.file),
            None => line.file.clone(),
        };
        let outcome = match (line.status, &line.error) {
            (Status::Ok, _) => "ok".to_string(),
            (Status::Failed, error) => format!("failed: {}", error.as_deref().unwrap_or("")),
        };
        match &self.bar {
            Some(bar) => {
                if line.status == Status::Failed {
                    bar.println(format!("{what}: {outcome}"));
                }
                bar.inc(1);
            }
            None => {
                let total = self.total.load(Ordering::Relaxed);
                let per_minute = finished as f64 / self.started.elapsed().as_secs_f64().max(1e-3) * 60.0;
                let eta = eta(total.saturating_sub(finished), per_minute);
                eprintln!("[{finished}/{total}] {what}: {outcome} ({per_minute:.1} pages/min, ETA {eta})");
            }
        }
    }

    pub fn finish(&self) {
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
    }
}

/// `h:mm:ss` left at this rate.
fn eta(left: u64, per_minute: f64) -> String {
    if per_minute <= 0.0 {
        return "?".into();
    }
    let secs = Duration::from_secs_f64(left as f64 / per_minute * 60.0).as_secs();
    format!("{}:{:02}:{:02}", secs / 3600, secs / 60 % 60, secs % 60)
}

#[cfg(test)]
mod tests {
    #[test]
    fn eta_reads_as_a_clock() {
        assert_eq!(super::eta(90, 30.0), "0:03:00");
        assert_eq!(super::eta(10, 0.0), "?");
    }
}
