//! The report: a table for people, JSON for machines.

use std::io::Write;

use super::{Error, Finding, Status};

fn label(s: Status) -> &'static str {
    match s {
        Status::Ok => "ok",
        Status::Fail => "FAIL",
        Status::Skip => "skip",
    }
}

/// `CHECK  STATUS  DETAIL` rows, each failure followed by its `fix:` line.
pub fn table(findings: &[Finding]) -> Result<(), Error> {
    let mut out = std::io::stdout().lock();
    let width = findings
        .iter()
        .map(|f| f.check.len())
        .max()
        .unwrap_or(5)
        .max(5);
    writeln!(out, "{:width$}  {:6}  DETAIL", "CHECK", "STATUS")?;
    for f in findings {
        writeln!(
            out,
            "{:width$}  {:6}  {}",
            f.check,
            label(f.status),
            f.detail
        )?;
        if let Some(fix) = f.fix.as_deref().filter(|_| f.status != Status::Ok) {
            writeln!(out, "{:width$}  {:6}  fix: {fix}", "", "")?;
        }
    }
    let failed = findings.iter().filter(|f| f.status == Status::Fail).count();
    let skipped = findings.iter().filter(|f| f.status == Status::Skip).count();
    writeln!(
        out,
        "{failed} failed, {skipped} skipped, {} ok",
        findings.len() - failed - skipped
    )?;
    Ok(())
}

/// `{"ok": bool, "checks": [{"check", "status", "detail", "fix"?}]}`.
pub fn json(findings: &[Finding], ok: bool) -> Result<(), Error> {
    let mut out = std::io::stdout().lock();
    serde_json::to_writer_pretty(
        &mut out,
        &serde_json::json!({ "ok": ok, "checks": findings }),
    )?;
    writeln!(out)?;
    Ok(())
}
