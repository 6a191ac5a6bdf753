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

use args::{Cli, ClusterCmd, Cmd, SeedCmd, VolumeCmd};
use client::Client;
use commands::{
    cluster, events, image, networks, nodes, realms, session, tasks, tokens, users, vms, volumes,
};
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
    // Local: needs no API address, credentials or cluster.
    if let Cmd::Seed(SeedCmd::New) = cli.cmd {
        println!("{}", new_join_secret());
        return Ok(());
    }
    // A copy between a file and a quic:// export needs no API either.
    let cmd = match cli.cmd {
        Cmd::Volume(VolumeCmd::Cp(a)) if !a.needs_api() => {
            return commands::volume_cp::run(None, a, out);
        }
        cmd => cmd,
    };
    let settings = Settings::resolve(cli.api, cli.ca_file.as_deref())?;
    let client = Client::new(
        settings.api.clone(),
        settings.token.clone(),
        settings.ca_pem.as_deref(),
    )?;
    match cmd {
        Cmd::ApiEndpoints | Cmd::Seed(_) => Ok(()),
        Cmd::Login { user } => session::login(&client, &settings, &user, out),
        Cmd::Logout => session::logout(&client, out),
        Cmd::Password => session::password(&client, out),
        Cmd::Cluster(ClusterCmd::Status) => cluster::status(&client, out),
        Cmd::Cluster(ClusterCmd::Settings) => commands::settings::show(&client, out),
        Cmd::Cluster(ClusterCmd::Set {
            vcpu_overcommit,
            replica_replace_after,
        }) => commands::settings::set(&client, vcpu_overcommit, replica_replace_after, out),
        Cmd::Node(cmd) => nodes::run(&client, cmd, out),
        Cmd::Token(cmd) => tokens::run(&client, cmd, out),
        Cmd::Certificate(cmd) => commands::certificate::run(&client, cmd, out),
        Cmd::Volume(cmd) => volumes::run(&client, cmd, out),
        Cmd::Vm(cmd) => vms::run(&client, cmd, out),
        Cmd::Image(cmd) => image::run(&client, cmd, out),
        Cmd::Network(cmd) => networks::run(&client, cmd, out),
        Cmd::Task(cmd) => tasks::run(&client, cmd, out),
        Cmd::User(cmd) => users::run(&client, cmd, out),
        Cmd::Event(cmd) => events::run(&client, cmd, out),
        Cmd::Realm(cmd) => realms::run(&client, cmd, out),
    }
}

/// A join secret of 32 characters drawn uniformly from letters and digits by the
/// operating system's generator: log2(62) x 32 = 190 bits, beyond any guessing.
fn new_join_secret() -> String {
    use rand::Rng;
    let mut rng = rand::rngs::OsRng;
    (0..32)
        .map(|_| rng.sample(rand::distributions::Alphanumeric) as char)
        .collect()
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_new_join_secret_is_32_random_letters_and_digits() {
        let a = super::new_join_secret();
        let b = super::new_join_secret();
        assert_eq!(a.len(), 32);
        assert!(a.bytes().all(|c| c.is_ascii_alphanumeric()), "{a}");
        assert_ne!(a, b, "two secrets alike");
        // Drawn from all 62 characters, not a subset (190 bits needs the whole alphabet):
        // over 64 secrets every class shows up.
        let many: String = (0..64).map(|_| super::new_join_secret()).collect();
        for class in [
            u8::is_ascii_lowercase as fn(&u8) -> bool,
            u8::is_ascii_uppercase,
            u8::is_ascii_digit,
        ] {
            assert!(many.bytes().any(|c| class(&c)), "{many}");
        }
    }
}
