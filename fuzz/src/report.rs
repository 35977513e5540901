//! The short pass and the tables: every target through [`generate::campaign`], one row each
//! (inputs, time, inputs/s, panics, hangs, slowest input), the first failing input saved for
//! `keybroker-fuzz replay`.

use std::fs;
use std::panic;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::generate::{self, Report};
use crate::{TIME_BOUND, Target};

/// Runs each target for `budget` or `inputs` inputs and prints the table; false when any input
/// failed (its first is saved under `failures`).
pub fn smoke(
    targets: &[&Target],
    budget: Duration,
    inputs: u64,
    seed: u64,
    failures: &Path,
) -> bool {
    // Panics are counted and the first of each target saved; their default report per input
    // would drown the table.
    let hook = panic::take_hook();
    panic::set_hook(Box::new(|_| {}));
    let limit = if inputs == u64::MAX {
        format!("{budget:?}")
    } else {
        format!("{budget:?} or {inputs} inputs")
    };
    println!(
        "generated inputs (seed {seed}), at most {limit} per target, {TIME_BOUND:?} CPU bound per input"
    );
    header();
    let mut ok = true;
    for t in targets {
        let report = generate::campaign(t, seed, inputs, budget);
        row(
            t.name,
            report.inputs,
            report.elapsed,
            report.failures,
            0,
            report.slowest,
        );
        if let Some(path) = save_failure(t, &report, seed, failures) {
            ok = false;
            failure_note(t, &report, &path);
        }
    }
    panic::set_hook(hook);
    ok
}

/// Prints the table's header.
pub fn header() {
    println!();
    println!(
        "| {:<18} | {:>10} | {:>9} | {:>10} | {:>7} | {:>6} | {:>11} |",
        "target", "inputs", "time s", "inputs/s", "panics", "hangs", "slowest ms"
    );
    println!(
        "|{:-<20}|{:->12}|{:->11}|{:->12}|{:->9}|{:->8}|{:->13}|",
        "", "", "", "", "", "", ""
    );
}

pub fn row(name: &str, inputs: u64, elapsed: Duration, panics: u64, hangs: u64, slowest: Duration) {
    let secs = elapsed.as_secs_f64();
    println!(
        "| {:<18} | {:>10} | {:>9.1} | {:>10.0} | {:>7} | {:>6} | {:>11} |",
        name,
        inputs,
        secs,
        inputs as f64 / secs.max(f64::EPSILON),
        panics,
        hangs,
        if slowest.is_zero() {
            "-".to_owned()
        } else {
            format!("{:.2}", slowest.as_secs_f64() * 1e3)
        }
    );
}

fn save_failure(t: &Target, report: &Report, seed: u64, dir: &Path) -> Option<PathBuf> {
    let (input, _) = report.first_failure.as_ref()?;
    let path = dir.join(format!("{}-seed{seed}", t.name));
    if let Err(e) = fs::create_dir_all(dir).and_then(|()| fs::write(&path, input)) {
        eprintln!("saving the failing input to {}: {e}", path.display());
    }
    Some(path)
}

fn failure_note(t: &Target, report: &Report, path: &Path) {
    if let Some((input, message)) = &report.first_failure {
        eprintln!(
            "{}: {} of {} inputs failed; the first ({} bytes) is saved in {}: {message}\n  replay: cargo run -p keybroker-fuzz -- replay {} {}",
            t.name,
            report.failures,
            report.inputs,
            input.len(),
            path.display(),
            t.name,
            path.display()
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::TARGETS;

    /// `make fuzz-smoke` runs this (ignored otherwise, so `make unit` stays quick):
    /// `FUZZ_SMOKE_SECONDS` per target, 3 by default.
    #[test]
    #[ignore = "the short pass of every fuzz target; make fuzz-smoke runs it"]
    fn fuzz_smoke() {
        let seconds = std::env::var("FUZZ_SMOKE_SECONDS")
            .ok()
            .and_then(|s| s.parse::<f64>().ok())
            .unwrap_or(3.0);
        let failures = std::env::var_os("CARGO_TARGET_DIR")
            .map_or_else(
                || PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target"),
                PathBuf::from,
            )
            .join("fuzz/failures");
        let all: Vec<&Target> = TARGETS.iter().collect();
        assert!(
            smoke(
                &all,
                Duration::from_secs_f64(seconds),
                u64::MAX,
                1,
                &failures
            ),
            "a fuzz target failed: see the saved input above"
        );
    }
}
