//! `tessera`: the command-line client of the Tessera REST API.
//!
//! It only talks to the API (any node's): it holds no state but the token `login` stores
//! in `~/.config/tessera/credentials.json` (mode 0600). Output is a table for people or
//! JSON (`--output json`) for scripts. Covered so far: login, password change, cluster
//! status, nodes, API tokens; the rest of the API's resources come with their endpoints.

use std::io::{BufRead, Write};
use std::path::PathBuf;

use anyhow::{bail, Context};
use clap::{Parser, Subcommand, ValueEnum};
use serde_json::{json, Value};

#[derive(Parser)]
#[command(
    name = "tessera",
    version,
    about = "Command-line client of the Tessera REST API"
)]
struct Cli {
    /// API base address, e.g. http://10.0.0.11:8006 (default: the one used at login).
    #[arg(long, global = true, env = "TESSERA_API")]
    api: Option<String>,
    /// Output format.
    #[arg(long, global = true, value_enum, default_value_t = Output::Table)]
    output: Output,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Clone, Copy, ValueEnum)]
enum Output {
    Table,
    Json,
}

#[derive(Subcommand)]
enum Cmd {
    /// Log in and store the session token (password from standard input).
    Login {
        /// User name.
        #[arg(long, default_value = "admin")]
        user: String,
    },
    /// Change the password (old and new password on two lines of standard input).
    Password,
    /// The cluster.
    #[command(subcommand)]
    Cluster(ClusterCmd),
    /// The nodes.
    #[command(subcommand)]
    Node(NodeCmd),
    /// API tokens.
    #[command(subcommand)]
    Token(TokenCmd),
}

#[derive(Subcommand)]
enum ClusterCmd {
    /// Leader, term and members.
    Status,
}

#[derive(Subcommand)]
enum NodeCmd {
    /// List the nodes and their health.
    Ls,
}

#[derive(Subcommand)]
enum TokenCmd {
    /// Create an API token.
    Create {
        /// auditor, operator or administrator (capped at your own role).
        #[arg(long, default_value = "auditor")]
        role: String,
        /// Lifetime, e.g. 3600, 90m, 12h, 30d.
        #[arg(long, default_value = "30d", value_parser = parse_duration)]
        expires: u64,
    },
    /// Revoke an API token.
    Rm {
        /// Token id.
        id: String,
    },
}

fn parse_duration(s: &str) -> Result<u64, String> {
    let (num, mult) = match s.chars().last() {
        Some('s') => (&s[..s.len() - 1], 1),
        Some('m') => (&s[..s.len() - 1], 60),
        Some('h') => (&s[..s.len() - 1], 3600),
        Some('d') => (&s[..s.len() - 1], 86400),
        _ => (s, 1),
    };
    num.parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(mult))
        .ok_or_else(|| format!("{s:?} is not a duration (try 3600, 90m, 12h, 30d)"))
}

fn credentials_path() -> anyhow::Result<PathBuf> {
    let base = std::env::var_os("XDG_CONFIG_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".config")))
        .context("neither XDG_CONFIG_HOME nor HOME is set")?;
    Ok(base.join("tessera").join("credentials.json"))
}

fn load_credentials() -> Option<Value> {
    serde_json::from_slice(&std::fs::read(credentials_path().ok()?).ok()?).ok()
}

fn save_credentials(api: &str, token: &str) -> anyhow::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let path = credentials_path()?;
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&path)?;
    f.write_all(json!({ "api": api, "token": token }).to_string().as_bytes())?;
    Ok(())
}

struct Client {
    api: String,
    token: Option<String>,
}

impl Client {
    fn call(&self, method: &str, path: &str, body: Option<Value>) -> anyhow::Result<Value> {
        let url = format!("{}/api/v1/{path}", self.api.trim_end_matches('/'));
        let mut req = ureq::request(method, &url).timeout(std::time::Duration::from_secs(30));
        if let Some(t) = &self.token {
            req = req.set("Authorization", &format!("Bearer {t}"));
        }
        let res = match body {
            Some(b) => req.send_json(b),
            None => req.call(),
        };
        match res {
            Ok(r) => Ok(r.into_json().unwrap_or(Value::Null)),
            Err(ureq::Error::Status(code, r)) => {
                let v: Value = r.into_json().unwrap_or(Value::Null);
                let msg = v["error"].as_str().unwrap_or("no details").to_string();
                let hint = if code == 401 {
                    " (log in with `tessera login`)"
                } else {
                    ""
                };
                bail!("{method} {path}: HTTP {code}: {msg}{hint}")
            }
            Err(e) => bail!("{method} {url}: {e}"),
        }
    }
}

fn read_line(what: &str) -> anyhow::Result<String> {
    let mut line = String::new();
    std::io::stdin()
        .lock()
        .read_line(&mut line)
        .with_context(|| format!("reading {what}"))?;
    let line = line.trim_end_matches(['\n', '\r']).to_string();
    if line.is_empty() {
        bail!("no {what} on standard input");
    }
    Ok(line)
}

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
    let saved = load_credentials();
    let api = cli
        .api
        .clone()
        .or_else(|| {
            saved
                .as_ref()
                .and_then(|c| c["api"].as_str().map(String::from))
        })
        .unwrap_or_else(|| "http://127.0.0.1:8006".to_string());
    let token = saved
        .as_ref()
        .and_then(|c| c["token"].as_str().map(String::from));
    let client = Client {
        api: api.clone(),
        token,
    };
    let out = |v: &Value, table: &dyn Fn(&Value)| match cli.output {
        Output::Json => println!("{}", serde_json::to_string_pretty(v).unwrap_or_default()),
        Output::Table => table(v),
    };
    match cli.cmd {
        Cmd::Login { user } => {
            let password = read_line("password")?;
            let v = Client {
                api: api.clone(),
                token: None,
            }
            .call(
                "POST",
                "login",
                Some(json!({ "username": user, "password": password })),
            )?;
            let token = v["token"]
                .as_str()
                .context("no token in the login answer")?;
            save_credentials(&api, token)?;
            out(&v, &|v| {
                println!("logged in to {api}");
                if v["must_change_password"] == true {
                    println!("the password must be changed first: tessera password");
                }
            });
        }
        Cmd::Password => {
            let (old, new) = (read_line("old password")?, read_line("new password")?);
            let v = client.call(
                "POST",
                "password",
                Some(json!({ "old_password": old, "new_password": new })),
            )?;
            out(&v, &|_| println!("password changed"));
        }
        Cmd::Cluster(ClusterCmd::Status) => {
            let v = client.call("GET", "cluster", None)?;
            out(&v, &|v| {
                println!("cluster: {}", v["cluster_id"].as_str().unwrap_or("-"));
                println!("leader:  {}", v["leader"]);
                println!("term:    {}", v["term"]);
                println!(
                    "voters:  {}",
                    v["voters"].as_array().map(|a| a.len()).unwrap_or(0)
                );
            });
        }
        Cmd::Node(NodeCmd::Ls) => {
            let v = client.call("GET", "nodes", None)?;
            out(&v, &|v| {
                println!("{:<34} {:<22} STATE", "ID", "ADDRESS");
                for n in v.as_array().into_iter().flatten() {
                    println!(
                        "{:<34} {:<22} {}",
                        n["id"].as_str().unwrap_or("-"),
                        n["address"].as_str().unwrap_or("-"),
                        n["state"].as_str().unwrap_or("-")
                    );
                }
            });
        }
        Cmd::Token(TokenCmd::Create { role, expires }) => {
            let v = client.call(
                "POST",
                "tokens",
                Some(json!({ "role": role, "expires_in_s": expires })),
            )?;
            out(&v, &|v| {
                println!("id:    {}", v["id"].as_str().unwrap_or("-"));
                println!("token: {}", v["token"].as_str().unwrap_or("-"));
                println!("role:  {}", v["role"].as_str().unwrap_or("-"));
            });
        }
        Cmd::Token(TokenCmd::Rm { id }) => {
            let v = client.call("DELETE", &format!("tokens/{id}"), None)?;
            out(&v, &|_| println!("revoked {id}"));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #[test]
    fn durations_parse() {
        assert_eq!(super::parse_duration("90m"), Ok(5400));
        assert_eq!(super::parse_duration("3600"), Ok(3600));
        assert_eq!(super::parse_duration("30d"), Ok(2_592_000));
        assert!(super::parse_duration("soon").is_err());
    }
}
