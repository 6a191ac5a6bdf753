//! `tessera`: the command-line client of the Tessera REST API.
//!
//! It only talks to the API (any node's): it holds no state but the token `login` stores
//! in `~/.config/tessera/credentials.json` (mode 0600). Output is a table for people
//! (nodes by name, sizes in binary units; `--output wide` adds ids) or the API's JSON
//! (`--output json`) for scripts. Every API operation it uses is listed in
//! [`endpoints::ENDPOINTS`] with the path template of the OpenAPI document; the test suite
//! checks that list against the document a running cluster serves (`tessera api-endpoints`).

#![forbid(unsafe_code)]

mod args;
mod client;
mod commands;
mod credentials;
mod endpoints;
mod node_names;
mod output;
mod prompt;

use clap::Parser;

use args::{Cli, ClusterCmd, Cmd};
use client::Client;
use commands::{cluster, events, networks, nodes, session, tasks, tokens, users, vms, volumes};
use credentials::Settings;

fn main() -> std::process::ExitCode {
    match run(Cli::parse()) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    let out = cli.output;
    if let Cmd::ApiEndpoints = cli.cmd {
        for e in endpoints::ENDPOINTS {
            println!("{} {}", e.0, e.1);
        }
        return Ok(());
    }
    let settings = Settings::resolve(cli.api, cli.ca_file.as_deref())?;
    let client = Client::new(
        settings.api.clone(),
        settings.token.clone(),
        settings.ca_pem.as_deref(),
    )?;
    match cli.cmd {
        Cmd::ApiEndpoints => Ok(()),
        Cmd::Login { user } => session::login(&client, &settings, &user, out),
        Cmd::Logout => session::logout(&client, out),
        Cmd::Password => session::password(&client, out),
        Cmd::Cluster(ClusterCmd::Status) => cluster::status(&client, out),
        Cmd::Node(cmd) => nodes::run(&client, cmd, out),
        Cmd::Token(cmd) => tokens::run(&client, cmd, out),
        Cmd::Volume(cmd) => volumes::run(&client, cmd, out),
        Cmd::Vm(cmd) => vms::run(&client, cmd, out),
        Cmd::Network(cmd) => networks::run(&client, cmd, out),
        Cmd::Task(cmd) => tasks::run(&client, cmd, out),
        Cmd::User(cmd) => users::run(&client, cmd, out),
        Cmd::Event(cmd) => events::run(&client, cmd, out),
    }
}
