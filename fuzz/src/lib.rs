//! Fuzz targets over everything in keybroker that parses what a tenant, a network peer or the
//! broker sends: AdmissionReview bodies, exchange requests and bearer tokens, the broker's
//! answers as the sidecar reads them, ApiKey scopes against guardrails, TTLs.
//!
//! Each target is a plain `fn(&[u8])` that panics when an oracle fails (not only on a crash: a
//! patch that does not apply, a policy over the STS limit, a credentials file with an injected
//! line). Two engines drive the same functions:
//! - AFL++ through afl.rs (`make fuzz`, `fuzz/afl.sh`): coverage-guided, on the stable
//!   toolchain (afl.rs instruments with rustc's stable sanitizer-coverage flags; libFuzzer's
//!   usual setup needs nightly).
//! - [`generate`]: seeds plus random mutations in-process (`make fuzz-smoke`, part of
//!   `make test`): no coverage feedback, but it needs no extra tool and takes seconds.
//!
//! Both fail an input that takes more than [`TIME_BOUND`] of CPU time: a parser that goes
//! quadratic on a crafted body is as much a defect here as one that panics.

pub mod generate;
pub mod report;
pub mod targets;

use std::time::Duration;

use nix::time::{ClockId, clock_gettime};

/// Longest CPU time one input may take, whatever it holds: 100 ms in optimized builds (AFL++'s
/// harness, release). Unoptimized code (the `make test` pass reuses the test profile's build)
/// runs the same work 10-30x slower, so there the bound is 1 s: it still fails any input that
/// goes quadratic, without failing an honest 512-character pattern check.
pub const TIME_BOUND: Duration = if cfg!(debug_assertions) && !cfg!(feature = "afl") {
    Duration::from_secs(1)
} else {
    Duration::from_millis(100)
};

/// One fuzz target.
#[derive(Debug)]
pub struct Target {
    /// What `make fuzz` and the tables call it.
    pub name: &'static str,
    /// What it covers, in a few words.
    pub about: &'static str,
    /// Runs one input; panics when an oracle fails.
    pub run: fn(&[u8]),
    /// Valid and near-valid inputs to start from.
    pub seeds: fn() -> Vec<Vec<u8>>,
    /// Tokens the mutators splice in (field names, values that steer decisions).
    pub dictionary: &'static [&'static str],
    /// Largest input worth generating (the real limit on that path, or the CRD's).
    pub max_len: usize,
}

/// Every target, in the order the tables list them.
pub const TARGETS: &[Target] = &[
    targets::admission::TARGET,
    targets::exchange::REQUEST,
    targets::exchange::TOKEN_PRECHECK,
    targets::sidecar::TARGET,
    targets::policy::PATTERN,
    targets::policy::POLICY,
    targets::policy::TTL,
];

/// The target called `name`.
pub fn target(name: &str) -> Option<&'static Target> {
    TARGETS.iter().find(|t| t.name == name)
}

/// CPU time of the calling thread: unlike wall time it does not grow when other work shares
/// the machine, so the bound holds on a busy CI host.
pub fn thread_cpu_time() -> Duration {
    clock_gettime(ClockId::CLOCK_THREAD_CPUTIME_ID)
        .map(Duration::from)
        .unwrap_or_default()
}

/// Runs `input` through `target` and panics if it took more than [`TIME_BOUND`] of CPU time.
/// Returns the CPU time taken.
pub fn run_bounded(target: &Target, input: &[u8]) -> Duration {
    let started = thread_cpu_time();
    (target.run)(input);
    let spent = thread_cpu_time().saturating_sub(started);
    assert!(
        spent <= TIME_BOUND,
        "{}: one input of {} bytes took {spent:?} of CPU time, over the {TIME_BOUND:?} bound",
        target.name,
        input.len()
    );
    spent
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn target_names_are_unique_and_every_target_accepts_its_seeds() {
        let mut names: Vec<_> = TARGETS.iter().map(|t| t.name).collect();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), TARGETS.len());
        for t in TARGETS {
            let seeds = (t.seeds)();
            assert!(!seeds.is_empty(), "{} has no seeds", t.name);
            for seed in seeds {
                assert!(seed.len() <= t.max_len, "{}: a seed over max_len", t.name);
                run_bounded(t, &seed);
            }
        }
    }

    fn spin(_: &[u8]) {
        let until = thread_cpu_time() + TIME_BOUND + Duration::from_millis(20);
        while thread_cpu_time() < until {
            std::hint::black_box(0u64);
        }
    }

    #[test]
    #[should_panic(expected = "of CPU time, over the")]
    fn an_input_over_the_time_bound_fails() {
        let slow = Target {
            name: "slow",
            about: "",
            run: spin,
            seeds: Vec::new,
            dictionary: &[],
            max_len: 1,
        };
        run_bounded(&slow, b"x");
    }
}
