//! The AFL++ harness: `keybroker-fuzz-afl <target>` under `afl-fuzz` (persistent mode, one
//! process for many inputs). A panic, including an input over the CPU time bound, aborts and
//! AFL++ saves the input as a crash. Built by `fuzz/afl.sh` through `cargo afl build`.

use keybroker_fuzz::{TARGETS, run_bounded, target};

fn main() {
    let name = std::env::args().nth(1).unwrap_or_default();
    let Some(t) = target(&name) else {
        let names: Vec<_> = TARGETS.iter().map(|t| t.name).collect();
        eprintln!(
            "usage: keybroker-fuzz-afl <target>, one of: {}",
            names.join(", ")
        );
        std::process::exit(2);
    };
    afl::fuzz(true, |data: &[u8]| {
        run_bounded(t, data);
    });
}
