//! `portcullis ca init|issue|inspect|serve|bootstrap`: the local CA from the command
//! line, and the identity service.

use anyhow::{anyhow, Result};

use crate::config::CaCommand;
use crate::identity::{inspect_files, CaFiles, Issuer, LeafRequest, NewCa, SpiffeId, TrustDomain};

/// Runs one `ca` subcommand, printing what it did.
pub fn run(cmd: CaCommand) -> Result<()> {
    match cmd {
        CaCommand::Serve(args) => return serve(*args),
        CaCommand::Bootstrap(args) => crate::install::bootstrap(&args)?,
        CaCommand::Init {
            out,
            trust_domain,
            ttl,
            force,
        } => {
            let td = TrustDomain::new(&trust_domain).map_err(|e| anyhow!("--trust-domain: {e}"))?;
            let files = NewCa::root(&td, ttl)?.write(&out, force)?;
            println!(
                "wrote {} and {} (trust domain {td})",
                files.cert.display(),
                files.key.display()
            );
        }
        CaCommand::Issue {
            ca,
            id,
            ttl,
            intermediate,
            out,
            force,
        } => {
            let id = SpiffeId::parse(&id).map_err(|e| anyhow!("--id: {e}"))?;
            let issuer = Issuer::load(&CaFiles::in_dir(&ca), id.trust_domain())
                .map_err(|e| anyhow!("--ca: {e}"))?;
            if intermediate {
                let files = NewCa::intermediate(&issuer, ttl)?.write(&out, force)?;
                println!(
                    "wrote intermediate CA {} and {}",
                    files.cert.display(),
                    files.key.display()
                );
            } else {
                let leaf = issuer.issue(&LeafRequest {
                    id: id.clone(),
                    ttl,
                })?;
                std::fs::create_dir_all(&out)
                    .map_err(|e| anyhow!("--out {}: {e}", out.display()))?;
                let crt = out.join("tls.crt");
                let key = out.join("tls.key");
                crate::identity::write_file(&crt, leaf.chain_pem().as_bytes(), 0o644, force)?;
                crate::identity::write_file(&key, leaf.key_pem().as_bytes(), 0o600, force)?;
                println!(
                    "wrote {} and {} for {id} (serial {})",
                    crt.display(),
                    key.display(),
                    leaf.serial
                );
            }
        }
        CaCommand::Inspect {
            files,
            bundle,
            json,
        } => {
            let paths: Vec<&std::path::Path> = files.iter().map(|p| p.as_path()).collect();
            let reports = inspect_files(&paths, bundle.as_deref())?;
            if json {
                println!("{}", serde_json::to_string_pretty(&reports)?);
            } else {
                for r in &reports {
                    print!("{}", r.render());
                }
            }
            if reports.iter().any(|r| r.chains_to_bundle == Some(false)) {
                return Err(anyhow!("a certificate does not chain to --bundle"));
            }
        }
    }
    Ok(())
}

/// `ca serve`: runs the identity service until SIGTERM or SIGINT, then
/// drains open requests and exits 0.
fn serve(args: crate::identity::serve::ServeArgs) -> Result<()> {
    use crate::identity::serve::CaServer;
    let settings = args.settings().map_err(anyhow::Error::msg)?;
    args.log.init().map_err(anyhow::Error::msg)?;
    crate::limits::raise_nofile_limit();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        let server = CaServer::bind(settings).await?;
        let drain = server.drain();
        tokio::spawn(async move {
            crate::drain::terminated().await;
            drain.begin();
        });
        server.run().await?;
        Ok(())
    })
}
