//! `moerunner make-layer`.

#[derive(clap::Args)]
pub struct Args {}

pub fn run(_args: Args) -> anyhow::Result<()> {
    anyhow::bail!("`make-layer` is not implemented yet")
}
