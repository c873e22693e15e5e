//! The `portcullis` binary: parses the command line and dispatches.

use std::process::ExitCode;

use clap::Parser;
use portcullis::config::{Cli, Command};

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        // --help, --version, and a bare command: clap's own text.
        Err(e)
            if !e.use_stderr()
                || e.kind() == clap::error::ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand =>
        {
            e.exit()
        }
        Err(e) => {
            eprintln!(
                "portcullis: error: {}",
                portcullis::config::one_line_error(&e)
            );
            return ExitCode::from(2);
        }
    };
    let result = match cli.command {
        Command::Run(args) => run(*args),
        Command::Ca(cmd) => portcullis::ca_cli::run(cmd),
        Command::Rules(cmd) => return portcullis::rules_cli::run(cmd),
        Command::Init(args) => portcullis::intercept::run(&args).map_err(anyhow::Error::from),
        Command::Inject(args) => {
            portcullis::inject::offline::run(&args).map_err(anyhow::Error::from)
        }
        Command::Webhook(args) => webhook(*args),
        Command::Await(args) => {
            return match runtime().map(|rt| rt.block_on(portcullis::await_ready::wait(&args))) {
                Ok(Ok(())) => ExitCode::SUCCESS,
                Ok(Err(e)) => {
                    eprintln!("portcullis: await: {e}");
                    ExitCode::FAILURE
                }
                Err(e) => {
                    eprintln!("portcullis: error: {e:#}");
                    ExitCode::from(2)
                }
            }
        }
        Command::Install(args) => portcullis::install::install(&args).map_err(anyhow::Error::from),
        Command::Demo(args) => runtime().and_then(|rt| rt.block_on(portcullis::demo::run(args))),
        Command::Check(args) => return portcullis::check::run(&args),
        Command::Completion { shell } => portcullis::config::completion(shell),
        Command::Man => portcullis::config::man_page(),
    };
    portcullis::logging::flush();
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("portcullis: error: {e:#}");
            ExitCode::from(2)
        }
    }
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?)
}

fn run(args: portcullis::config::RunArgs) -> anyhow::Result<()> {
    let settings = args.settings().map_err(anyhow::Error::msg)?;
    args.log.init().map_err(anyhow::Error::msg)?;
    portcullis::limits::raise_nofile_limit();
    portcullis::runtime::build()?.block_on(async {
        let app = portcullis::app::App::bind(settings).await?;
        let drain = app.drain();
        tokio::spawn(async move {
            portcullis::drain::terminated().await;
            drain.begin();
        });
        app.run().await
    })
}

fn webhook(args: portcullis::inject::webhook::WebhookArgs) -> anyhow::Result<()> {
    args.log.init().map_err(anyhow::Error::msg)?;
    portcullis::limits::raise_nofile_limit();
    runtime()?.block_on(portcullis::inject::webhook::run(args))?;
    Ok(())
}
