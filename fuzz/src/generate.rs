//! The in-process engine: seeds plus random mutations (bit flips, dictionary splices, repeated
//! and truncated ranges, crossovers), run under the time bound with panics caught and counted.
//! No coverage feedback, so it finds less than AFL++ per input, but it needs no instrumented
//! build and its runs are reproducible from the seed it prints.

use std::panic::{self, AssertUnwindSafe};
use std::time::{Duration, Instant};

use crate::{Target, run_bounded};

/// SplitMix64: small, fast and reproducible; no cryptographic use.
#[derive(Clone, Debug)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Self(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n` (`n` > 0).
    pub fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n.max(1) as u64) as usize
    }
}

/// Values that break parsers more often than random bytes do.
const INTERESTING: &[&str] = &[
    "0",
    "-1",
    "2147483648",
    "9223372036854775808",
    "18446744073709551616",
    "1e309",
    "-0",
    "null",
    "true",
    "\"\"",
    "[]",
    "{}",
    "\"\\u0000\"",
    "\"\\ud800\"",
    "\u{00e9}",
    "\u{1f600}",
    ",",
    ":",
    "\"",
    "\\",
];

/// Mutates a copy of one seed (or a splice of two) into a new input of at most `target.max_len`.
pub fn mutate(rng: &mut Rng, seeds: &[Vec<u8>], target: &Target) -> Vec<u8> {
    let mut data = seeds[rng.below(seeds.len())].clone();
    for _ in 0..=rng.below(8) {
        let len = data.len();
        let at = rng.below(len + 1);
        match rng.below(10) {
            0 if len > 0 => {
                let i = rng.below(len);
                data[i] ^= 1 << rng.below(8);
            }
            1 if len > 0 => {
                let i = rng.below(len);
                data[i] = rng.next_u64() as u8;
            }
            2 | 3 if !target.dictionary.is_empty() => {
                let token = target.dictionary[rng.below(target.dictionary.len())];
                data.splice(at..at, token.bytes());
            }
            4 => {
                let token = INTERESTING[rng.below(INTERESTING.len())];
                data.splice(at..at, token.bytes());
            }
            5 if len > 0 => {
                let end = (at + 1 + rng.below(32)).min(len);
                data.drain(at.min(end)..end);
            }
            // Repeat a range many times: how lists of 50,000 names and deep nesting appear.
            6 if len > 0 => {
                let start = rng.below(len);
                let end = (start + 1 + rng.below(64)).min(len);
                let chunk = data[start..end].to_vec();
                let times = 1 << rng.below(12);
                let room = target.max_len.saturating_sub(len) / chunk.len().max(1);
                for _ in 0..times.min(room) {
                    data.splice(end..end, chunk.iter().copied());
                }
            }
            7 => data.truncate(at),
            8 => {
                let other = &seeds[rng.below(seeds.len())];
                let from = rng.below(other.len() + 1);
                data.truncate(at);
                data.extend_from_slice(&other[from..]);
            }
            _ if len > 1 => {
                let (i, j) = (rng.below(len), rng.below(len));
                data.swap(i, j);
            }
            _ => data.push(rng.next_u64() as u8),
        }
    }
    data.truncate(target.max_len);
    data
}

/// What one campaign over one target found.
#[derive(Debug, Default)]
pub struct Report {
    pub inputs: u64,
    pub elapsed: Duration,
    /// Inputs that panicked, or exceeded the time bound (that too is a panic in the harness).
    pub failures: u64,
    /// The slowest input's CPU time.
    pub slowest: Duration,
    /// The first failing input and its panic message, to save and replay.
    pub first_failure: Option<(Vec<u8>, String)>,
}

/// Runs the seeds, then mutated inputs, until `inputs` were run or `budget` elapsed.
pub fn campaign(target: &Target, seed: u64, inputs: u64, budget: Duration) -> Report {
    let mut rng = Rng::new(seed);
    let seeds = (target.seeds)();
    let mut report = Report::default();
    let started = Instant::now();
    let mut n = 0usize;
    while report.inputs < inputs && started.elapsed() < budget {
        let input = match seeds.get(n) {
            Some(seed) => seed.clone(),
            None if seeds.is_empty() => Vec::new(),
            None => mutate(&mut rng, &seeds, target),
        };
        n += 1;
        match panic::catch_unwind(AssertUnwindSafe(|| run_bounded(target, &input))) {
            Ok(spent) => report.slowest = report.slowest.max(spent),
            Err(payload) => {
                report.failures += 1;
                if report.first_failure.is_none() {
                    report.first_failure = Some((input, panic_message(payload.as_ref())));
                }
            }
        }
        report.inputs += 1;
    }
    report.elapsed = started.elapsed();
    report
}

/// The text of a panic payload.
pub fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    payload
        .downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a panic without a message".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn picky(input: &[u8]) {
        assert!(!input.contains(&b'!'), "found the bang");
    }

    fn target() -> Target {
        Target {
            name: "picky",
            about: "",
            run: picky,
            seeds: || vec![b"hello".to_vec()],
            dictionary: &["!"],
            max_len: 64,
        }
    }

    #[test]
    fn a_campaign_counts_panics_and_keeps_the_first_input() {
        panic::set_hook(Box::new(|_| {}));
        let report = campaign(&target(), 1, 2_000, Duration::from_secs(30));
        let _ = panic::take_hook();
        assert_eq!(report.inputs, 2_000);
        assert!(
            report.failures > 0,
            "the mutator never spliced the token in"
        );
        let (input, message) = report.first_failure.unwrap();
        assert!(input.contains(&b'!'));
        assert_eq!(message, "found the bang");
    }

    #[test]
    fn mutations_stay_within_max_len_and_are_reproducible() {
        let t = target();
        let seeds = (t.seeds)();
        let (mut a, mut b) = (Rng::new(7), Rng::new(7));
        for _ in 0..1_000 {
            let x = mutate(&mut a, &seeds, &t);
            assert!(x.len() <= t.max_len);
            assert_eq!(x, mutate(&mut b, &seeds, &t));
        }
    }
}
