//! `keybroker-fuzz`: the in-process short pass (`smoke`, run by `make test`), the seed corpus
//! and dictionaries AFL++ starts from (`seeds`), the table of an AFL++ campaign (`afl-report`),
//! and `replay` of a saved input.

use std::fs;
use std::panic::{self, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use keybroker_fuzz::generate;
use keybroker_fuzz::report::{header, row, smoke};
use keybroker_fuzz::{TARGETS, Target, run_bounded, target};

#[derive(Parser, Debug)]
#[command(about = "keybroker's fuzz targets")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// List the targets.
    List,
    /// Generated inputs (seeds, then mutations) through each target, as a table; fails on any
    /// panic or input over the time bound.
    Smoke {
        /// Stop a target after this many seconds...
        #[arg(long, default_value_t = 3.0)]
        seconds: f64,
        /// ...or after this many inputs, whichever comes first.
        #[arg(long, default_value_t = 1_000_000)]
        inputs: u64,
        /// The generator's seed (printed, so a failure can be reproduced).
        #[arg(long, default_value_t = 1)]
        seed: u64,
        /// Where the first failing input of each target is saved.
        #[arg(long, default_value = "target/fuzz/failures")]
        failures: PathBuf,
        /// Only these targets (default: all).
        targets: Vec<String>,
    },
    /// Write each target's seeds to DIR/<target>/ and its dictionary to DIR/<target>.dict.
    Seeds { dir: PathBuf },
    /// The table of an AFL++ campaign from DIR/<target>/default/fuzzer_stats; fails on any
    /// crash or hang, or when a target ran fewer than --min-inputs.
    AflReport {
        dir: PathBuf,
        #[arg(long, default_value_t = 0)]
        min_inputs: u64,
        targets: Vec<String>,
    },
    /// Run saved inputs through a target and say what each did.
    Replay { target: String, files: Vec<PathBuf> },
}

fn main() -> ExitCode {
    match Cli::parse().command {
        Command::List => {
            for t in TARGETS {
                println!("{:<18} {}", t.name, t.about);
            }
            ExitCode::SUCCESS
        }
        Command::Smoke {
            seconds,
            inputs,
            seed,
            failures,
            targets,
        } => {
            let ok = smoke(
                &selected(&targets),
                Duration::from_secs_f64(seconds.max(0.0)),
                inputs,
                seed,
                &failures,
            );
            if ok {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            }
        }
        Command::Seeds { dir } => match write_seeds(&dir) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("writing seeds into {}: {e}", dir.display());
                ExitCode::FAILURE
            }
        },
        Command::AflReport {
            dir,
            min_inputs,
            targets,
        } => afl_report(&dir, min_inputs, &selected(&targets)),
        Command::Replay {
            target: name,
            files,
        } => replay(&name, &files),
    }
}

/// The named targets, or all; unknown names are reported and skipped.
fn selected(names: &[String]) -> Vec<&'static Target> {
    if names.is_empty() {
        return TARGETS.iter().collect();
    }
    names
        .iter()
        .filter_map(|n| {
            let t = target(n);
            if t.is_none() {
                eprintln!("no target {n:?}; `keybroker-fuzz list` shows them");
            }
            t
        })
        .collect()
}

fn write_seeds(dir: &Path) -> std::io::Result<()> {
    for t in TARGETS {
        let seeds_dir = dir.join(t.name);
        fs::create_dir_all(&seeds_dir)?;
        for (i, seed) in (t.seeds)().iter().enumerate() {
            fs::write(seeds_dir.join(format!("seed-{i:03}")), seed)?;
        }
        let dict: String = t
            .dictionary
            .iter()
            .map(|token| format!("\"{}\"\n", afl_escape(token)))
            .collect();
        fs::write(dir.join(format!("{}.dict", t.name)), dict)?;
    }
    Ok(())
}

/// A dictionary token in AFL's format: printable ASCII as is, `"` and `\` and the rest as \xNN.
fn afl_escape(token: &str) -> String {
    token
        .bytes()
        .map(|b| match b {
            b'"' | b'\\' => format!("\\x{b:02x}"),
            0x20..=0x7e => (b as char).to_string(),
            _ => format!("\\x{b:02x}"),
        })
        .collect()
}

fn afl_report(dir: &Path, min_inputs: u64, targets: &[&Target]) -> ExitCode {
    println!(
        "AFL++ campaign in {} (coverage-guided; panics = crashes, which include inputs over the harness's 100ms CPU bound)",
        dir.display()
    );
    header();
    let mut failed = false;
    for t in targets {
        let stats_path = dir.join(t.name).join("default").join("fuzzer_stats");
        let Ok(stats) = fs::read_to_string(&stats_path) else {
            println!(
                "| {:<18} | no fuzzer_stats in {} |",
                t.name,
                stats_path.display()
            );
            failed = true;
            continue;
        };
        let field = |name: &str| -> u64 {
            stats
                .lines()
                .filter_map(|l| l.split_once(':'))
                .find(|(k, _)| k.trim() == name)
                .and_then(|(_, v)| v.trim().parse::<f64>().ok())
                .map_or(0, |v| v as u64)
        };
        let inputs = field("execs_done");
        let crashes = field("saved_crashes");
        let hangs = field("saved_hangs");
        let elapsed = Duration::from_secs(field("run_time"));
        row(t.name, inputs, elapsed, crashes, hangs, Duration::ZERO);
        if crashes > 0 || hangs > 0 {
            failed = true;
            eprintln!(
                "{}: inputs saved in {}/{{crashes,hangs}}; replay: cargo run -p keybroker-fuzz -- replay {} <file>",
                t.name,
                dir.join(t.name).join("default").display(),
                t.name
            );
        }
        if inputs < min_inputs {
            failed = true;
            eprintln!("{}: ran {inputs} inputs, fewer than {min_inputs}", t.name);
        }
    }
    if failed {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}

fn replay(name: &str, files: &[PathBuf]) -> ExitCode {
    let Some(t) = target(name) else {
        eprintln!("no target {name:?}; `keybroker-fuzz list` shows them");
        return ExitCode::FAILURE;
    };
    // The default panic hook stays: it shows where the failing oracle is.
    let mut failed = false;
    for file in files {
        let input = match fs::read(file) {
            Ok(input) => input,
            Err(e) => {
                eprintln!("{}: {e}", file.display());
                failed = true;
                continue;
            }
        };
        match panic::catch_unwind(AssertUnwindSafe(|| run_bounded(t, &input))) {
            Ok(spent) => println!("{}: ok in {spent:?} of CPU time", file.display()),
            Err(payload) => {
                failed = true;
                println!(
                    "{}: FAILED: {}",
                    file.display(),
                    generate::panic_message(payload.as_ref())
                );
            }
        }
    }
    if failed {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}
