//! `portcullis demo`: a whole mesh on loopback for a newcomer.
use anyhow::Result;

use crate::config::DemoArgs;

pub async fn run(_args: DemoArgs) -> Result<()> {
    anyhow::bail!("demo: not yet")
}
