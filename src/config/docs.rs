//! Shell completions and the man page, both generated from the same clap
//! definitions as `--help`, so they cannot drift from the flags.

use std::io::Write;

use clap::CommandFactory;

use super::Cli;

/// Writes the completion script for `shell` to stdout.
pub fn completion(shell: clap_complete::Shell) -> anyhow::Result<()> {
    let mut cmd = Cli::command();
    // Into memory first: clap_complete panics on a write error, e.g. when
    // stdout is a pipe that `head` has closed.
    let mut out = Vec::new();
    clap_complete::generate(shell, &mut cmd, "portcullis", &mut out);
    to_stdout(&out)
}

/// Writes `portcullis.1` (roff) to stdout: the top-level page, then one
/// section per command with its flags.
pub fn man_page() -> anyhow::Result<()> {
    let mut out = Vec::new();
    render_man(&mut out)?;
    to_stdout(&out)
}

/// Writes `text` to stdout. A reader that went away (`| head`, `| less`
/// quit early) has all it wanted: like other command-line tools, end
/// quietly and successfully instead of reporting the broken pipe.
fn to_stdout(text: &[u8]) -> anyhow::Result<()> {
    let mut out = std::io::stdout().lock();
    match out.write_all(text).and_then(|()| out.flush()) {
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
        r => Ok(r?),
    }
}

fn render_man(out: &mut impl Write) -> anyhow::Result<()> {
    let cmd = Cli::command();
    let man = clap_mangen::Man::new(cmd.clone());
    man.render_title(out)?;
    man.render_name_section(out)?;
    man.render_synopsis_section(out)?;
    man.render_description_section(out)?;
    for sub in cmd.get_subcommands() {
        section(out, sub, "portcullis")?;
    }
    man.render_version_section(out)?;
    Ok(())
}

/// One `.SH` per runnable command (`portcullis ca issue`…): what it does,
/// its synopsis and its flags.
fn section(out: &mut impl Write, cmd: &clap::Command, parent: &str) -> anyhow::Result<()> {
    let name = format!("{parent} {}", cmd.get_name());
    if cmd.has_subcommands() {
        for sub in cmd.get_subcommands() {
            section(out, sub, &name)?;
        }
        return Ok(());
    }
    let page = clap_mangen::Man::new(cmd.clone().bin_name(name.clone()));
    writeln!(out, ".SH \"{}\"", name.to_uppercase())?;
    if let Some(about) = cmd.get_long_about().or(cmd.get_about()) {
        writeln!(out, "{}", escape(&about.to_string()))?;
    }
    // Within a command's section its synopsis and flags are subsections.
    let mut body = Vec::new();
    page.render_synopsis_section(&mut body)?;
    page.render_options_section(&mut body)?;
    let body = String::from_utf8_lossy(&body)
        .replace(".SH SYNOPSIS", ".SS Synopsis")
        .replace(".SH OPTIONS", ".SS Options");
    out.write_all(body.as_bytes())?;
    Ok(())
}

/// Keeps a line that starts with `.` or `'` from being read as a request.
fn escape(text: &str) -> String {
    text.lines()
        .map(|l| {
            let l = l.replace('\\', "\\\\");
            if l.starts_with(['.', '\'']) {
                format!("\\&{l}")
            } else {
                l
            }
        })
        .collect::<Vec<_>>()
        .join("\n")
}
