//! `crdgen`: writes keybroker's CustomResourceDefinitions as YAML, one file per CRD.

use std::path::PathBuf;

use anyhow::Context;
use clap::Parser;

#[derive(Debug, Parser)]
#[command(about = "Write keybroker's CRDs (generated from the Rust types) as YAML files")]
struct Args {
    /// Directory to write `<plural>.<group>.yaml` files into.
    #[arg(long, default_value = "crds")]
    out: PathBuf,
    /// Do not write; fail if any file in --out differs from what would be written.
    #[arg(long)]
    check: bool,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let mut stale = Vec::new();
    for crd in keybroker_operator::crds() {
        let name = crd.metadata.name.clone().context("CRD without a name")?;
        let path = args.out.join(format!("{name}.yaml"));
        let yaml = keybroker_operator::crd_yaml(&crd)?;
        if args.check {
            if std::fs::read_to_string(&path).ok().as_deref() != Some(yaml.as_str()) {
                stale.push(path.display().to_string());
            }
        } else {
            std::fs::create_dir_all(&args.out)?;
            std::fs::write(&path, yaml).with_context(|| format!("writing {}", path.display()))?;
            println!("wrote {}", path.display());
        }
    }
    anyhow::ensure!(
        stale.is_empty(),
        "stale CRDs (run `make crds`): {}",
        stale.join(", ")
    );
    Ok(())
}
