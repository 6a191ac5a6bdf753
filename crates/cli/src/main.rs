//! `tessera`: the command-line client of the Tessera REST API.
//!
//! It only talks to the API (any node's): it holds no state but the token `login` stores
//! in `~/.config/tessera/credentials.json` (mode 0600). Output is a table for people or
//! JSON (`--output json`) for scripts. Every API operation it uses is listed in
//! [`ENDPOINTS`] with the path template of the OpenAPI document; the test suite checks
//! that list against the document a running cluster serves (`tessera api-endpoints`).

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
    /// API base address, e.g. https://10.0.0.11:8006 (default: the one used at login).
    #[arg(long, global = true, env = "TESSERA_API")]
    api: Option<String>,
    /// Output format.
    #[arg(long, global = true, value_enum, default_value_t = Output::Table)]
    output: Output,
    /// The cluster CA certificate to check the API's HTTPS with (a node's
    /// `<data_dir>/tls/ca.crt`); remembered at login.
    #[arg(long, global = true, env = "TESSERA_CA_FILE")]
    ca_file: Option<PathBuf>,
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
    /// End this session.
    Logout,
    /// Volumes, snapshots and clones.
    #[command(subcommand)]
    Volume(VolumeCmd),
    /// VM definitions.
    #[command(subcommand)]
    Vm(VmCmd),
    /// Virtual networks.
    #[command(subcommand)]
    Network(NetworkCmd),
    /// Long operations.
    #[command(subcommand)]
    Task(TaskCmd),
    /// Users (administrators only).
    #[command(subcommand)]
    User(UserCmd),
    /// What happened in the cluster.
    #[command(subcommand)]
    Event(EventCmd),
    /// Print the API operations this client uses (method and OpenAPI path), one per line.
    #[command(hide = true)]
    ApiEndpoints,
}

#[derive(Subcommand)]
enum VolumeCmd {
    /// Create a volume (waits for its task unless --no-wait).
    Create {
        /// Name.
        name: String,
        /// Size, e.g. 10G, 512M, 1T (binary units) or bytes.
        #[arg(long, value_parser = parse_size)]
        size: u64,
        /// Node id of the store to hold it (default: the node you talk to).
        #[arg(long)]
        node: Option<String>,
        /// Return once the task is queued.
        #[arg(long)]
        no_wait: bool,
    },
    /// List volumes.
    Ls,
    /// Show one volume with its snapshots.
    Show {
        /// Name.
        name: String,
    },
    /// Snapshot a volume.
    Snapshot {
        /// Volume.
        volume: String,
        /// Snapshot name.
        snapshot: String,
        /// Return once the task is queued.
        #[arg(long)]
        no_wait: bool,
    },
    /// Delete a snapshot.
    SnapshotRm {
        /// Volume.
        volume: String,
        /// Snapshot name.
        snapshot: String,
        /// Return once the task is queued.
        #[arg(long)]
        no_wait: bool,
    },
    /// Clone a snapshot into a new volume.
    Clone {
        /// Volume.
        volume: String,
        /// Snapshot.
        snapshot: String,
        /// New volume's name.
        name: String,
        /// Return once the task is queued.
        #[arg(long)]
        no_wait: bool,
    },
    /// Delete a volume and its snapshots.
    Rm {
        /// Name.
        name: String,
        /// Return once the task is queued.
        #[arg(long)]
        no_wait: bool,
    },
}

#[derive(Subcommand)]
enum VmCmd {
    /// Define a VM.
    Create {
        /// Name.
        name: String,
        /// Virtual CPUs.
        #[arg(long, default_value_t = 1)]
        vcpus: u32,
        /// Memory, e.g. 512M, 2G.
        #[arg(long, default_value = "512M", value_parser = parse_size)]
        memory: u64,
        /// A volume to attach (repeat for more; the first boots).
        #[arg(long = "disk")]
        disks: Vec<String>,
        /// A network to attach a NIC to (repeat for more).
        #[arg(long = "network")]
        networks: Vec<String>,
        /// Kernel image path on the node.
        #[arg(long)]
        kernel: Option<String>,
        /// Kernel command line.
        #[arg(long)]
        cmdline: Option<String>,
        /// Pin to a node id.
        #[arg(long)]
        node: Option<String>,
    },
    /// List VMs.
    Ls,
    /// Show one VM.
    Show {
        /// Name.
        name: String,
    },
    /// Change a VM's definition or desired state.
    Set {
        /// Name.
        name: String,
        /// Virtual CPUs.
        #[arg(long)]
        vcpus: Option<u32>,
        /// Memory, e.g. 1G.
        #[arg(long, value_parser = parse_size)]
        memory: Option<u64>,
        /// Replace the disks (repeat).
        #[arg(long = "disk")]
        disks: Option<Vec<String>>,
        /// stopped or running.
        #[arg(long)]
        desired_state: Option<String>,
    },
    /// Delete a VM definition (its volumes stay).
    Rm {
        /// Name.
        name: String,
    },
}

#[derive(Subcommand)]
enum NetworkCmd {
    /// Define a network.
    Create {
        /// Name.
        name: String,
        /// Linux bridge name.
        #[arg(long)]
        bridge: String,
        /// VLAN id on the uplink.
        #[arg(long)]
        vlan: Option<u16>,
        /// Uplink interface.
        #[arg(long)]
        uplink: Option<String>,
    },
    /// List networks.
    Ls,
    /// Delete a network no VM uses.
    Rm {
        /// Name.
        name: String,
    },
}

#[derive(Subcommand)]
enum TaskCmd {
    /// List tasks.
    Ls,
    /// Show a task with its log.
    Show {
        /// Task id.
        id: String,
    },
    /// Follow a task to its end with a progress bar; fails if the task fails.
    Watch {
        /// Task id.
        id: String,
    },
}

#[derive(Subcommand)]
enum UserCmd {
    /// List users.
    Ls,
    /// Create a user (initial password on standard input; it must be changed at first login).
    Create {
        /// User name.
        name: String,
        /// auditor, operator or administrator.
        #[arg(long)]
        role: String,
    },
    /// Change a user's role.
    SetRole {
        /// User name.
        name: String,
        /// auditor, operator or administrator.
        role: String,
    },
    /// Delete a user.
    Rm {
        /// User name.
        name: String,
    },
}

#[derive(Subcommand)]
enum EventCmd {
    /// The latest events.
    Ls {
        /// How many.
        #[arg(long, default_value_t = 50)]
        limit: usize,
    },
    /// Follow events as they happen (Ctrl-C stops).
    Watch,
}

/// An API operation: method and the path template of the OpenAPI document.
#[derive(Clone, Copy)]
struct Ep(&'static str, &'static str);

const LOGIN: Ep = Ep("POST", "/api/v1/login");
const LOGOUT: Ep = Ep("POST", "/api/v1/logout");
const PASSWORD: Ep = Ep("POST", "/api/v1/password");
const CLUSTER: Ep = Ep("GET", "/api/v1/cluster");
const NODES: Ep = Ep("GET", "/api/v1/nodes");
const NODE_RM: Ep = Ep("DELETE", "/api/v1/nodes/{id}");
const TOKEN_CREATE: Ep = Ep("POST", "/api/v1/tokens");
const TOKEN_RM: Ep = Ep("DELETE", "/api/v1/tokens/{id}");
const VOLUMES: Ep = Ep("GET", "/api/v1/volumes");
const VOLUME_CREATE: Ep = Ep("POST", "/api/v1/volumes");
const VOLUME: Ep = Ep("GET", "/api/v1/volumes/{name}");
const VOLUME_RM: Ep = Ep("DELETE", "/api/v1/volumes/{name}");
const SNAPSHOT_CREATE: Ep = Ep("POST", "/api/v1/volumes/{name}/snapshots");
const SNAPSHOT_RM: Ep = Ep("DELETE", "/api/v1/volumes/{name}/snapshots/{snapshot}");
const CLONE: Ep = Ep("POST", "/api/v1/volumes/{name}/clone");
const VMS: Ep = Ep("GET", "/api/v1/vms");
const VM_CREATE: Ep = Ep("POST", "/api/v1/vms");
const VM: Ep = Ep("GET", "/api/v1/vms/{name}");
const VM_SET: Ep = Ep("PATCH", "/api/v1/vms/{name}");
const VM_RM: Ep = Ep("DELETE", "/api/v1/vms/{name}");
const NETWORKS: Ep = Ep("GET", "/api/v1/networks");
const NETWORK_CREATE: Ep = Ep("POST", "/api/v1/networks");
const NETWORK_RM: Ep = Ep("DELETE", "/api/v1/networks/{name}");
const TASKS: Ep = Ep("GET", "/api/v1/tasks");
const TASK: Ep = Ep("GET", "/api/v1/tasks/{id}");
const USERS: Ep = Ep("GET", "/api/v1/users");
const USER_CREATE: Ep = Ep("POST", "/api/v1/users");
const USER_SET: Ep = Ep("PATCH", "/api/v1/users/{username}");
const USER_RM: Ep = Ep("DELETE", "/api/v1/users/{username}");
const EVENTS: Ep = Ep("GET", "/api/v1/events");
const EVENT_STREAM: Ep = Ep("GET", "/api/v1/events/stream");

/// Every operation the CLI uses.
const ENDPOINTS: &[Ep] = &[
    LOGIN,
    LOGOUT,
    PASSWORD,
    CLUSTER,
    NODES,
    NODE_RM,
    TOKEN_CREATE,
    TOKEN_RM,
    VOLUMES,
    VOLUME_CREATE,
    VOLUME,
    VOLUME_RM,
    SNAPSHOT_CREATE,
    SNAPSHOT_RM,
    CLONE,
    VMS,
    VM_CREATE,
    VM,
    VM_SET,
    VM_RM,
    NETWORKS,
    NETWORK_CREATE,
    NETWORK_RM,
    TASKS,
    TASK,
    USERS,
    USER_CREATE,
    USER_SET,
    USER_RM,
    EVENTS,
    EVENT_STREAM,
];

/// Fills the `{...}` parameters of a path template in order, percent-encoding them.
fn fill(template: &str, params: &[&str]) -> String {
    let mut out = String::new();
    let mut rest = template;
    let mut params = params.iter();
    while let Some(start) = rest.find('{') {
        out.push_str(&rest[..start]);
        let end = rest[start..]
            .find('}')
            .map(|e| start + e + 1)
            .unwrap_or(rest.len());
        let p = params.next().copied().unwrap_or_default();
        for b in p.bytes() {
            if b.is_ascii_alphanumeric() || b"-._~@".contains(&b) {
                out.push(b as char);
            } else {
                out.push_str(&format!("%{b:02X}"));
            }
        }
        rest = &rest[end..];
    }
    out.push_str(rest);
    out
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
    /// Remove a dead node from the cluster (wipe it before starting it again).
    Rm {
        /// Node id.
        id: String,
        /// Even if it looks up or still holds volumes.
        #[arg(long)]
        force: bool,
    },
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

/// Sizes: bytes, or a number with K, M, G, T (binary units, an optional trailing "iB").
fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim().trim_end_matches("iB").trim_end_matches('B');
    let (num, mult) = match t.chars().last().map(|c| c.to_ascii_uppercase()) {
        Some('K') => (&t[..t.len() - 1], 1u64 << 10),
        Some('M') => (&t[..t.len() - 1], 1 << 20),
        Some('G') => (&t[..t.len() - 1], 1 << 30),
        Some('T') => (&t[..t.len() - 1], 1 << 40),
        _ => (t, 1),
    };
    num.parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(mult))
        .ok_or_else(|| format!("{s:?} is not a size (try 10G, 512M, 1T or bytes)"))
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

fn save_credentials(api: &str, token: &str, ca_pem: Option<&str>) -> anyhow::Result<()> {
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
    f.write_all(
        json!({ "api": api, "token": token, "ca_pem": ca_pem })
            .to_string()
            .as_bytes(),
    )?;
    Ok(())
}

struct Client {
    api: String,
    token: Option<String>,
    agent: ureq::Agent,
}

/// An HTTP agent that trusts only the cluster CA `ca_pem` when given (else the system's
/// usual roots, which will not know a cluster's own CA).
fn agent(ca_pem: Option<&str>) -> anyhow::Result<ureq::Agent> {
    let Some(pem) = ca_pem else {
        return Ok(ureq::AgentBuilder::new().build());
    };
    use rustls_pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    for c in rustls_pki_types::CertificateDer::pem_slice_iter(pem.as_bytes()) {
        roots
            .add(c.context("reading the CA certificate")?)
            .context("using the CA certificate")?;
    }
    if roots.is_empty() {
        bail!("no certificate in the CA file");
    }
    let config = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()?
    .with_root_certificates(roots)
    .with_no_client_auth();
    Ok(ureq::AgentBuilder::new()
        .tls_config(std::sync::Arc::new(config))
        .build())
}

impl Client {
    fn request(&self, ep: Ep, params: &[&str], query: &str) -> (String, ureq::Request) {
        let path = fill(ep.1, params);
        let url = format!("{}{path}{query}", self.api.trim_end_matches('/'));
        let mut req = self.agent.request(ep.0, &url);
        if let Some(t) = &self.token {
            req = req.set("Authorization", &format!("Bearer {t}"));
        }
        (path, req)
    }

    fn call(&self, ep: Ep, params: &[&str], body: Option<Value>) -> anyhow::Result<Value> {
        self.call_q(ep, params, "", body)
    }

    fn call_q(
        &self,
        ep: Ep,
        params: &[&str],
        query: &str,
        body: Option<Value>,
    ) -> anyhow::Result<Value> {
        let (path, req) = self.request(ep, params, query);
        let (method, url) = (ep.0, format!("{}{path}", self.api));
        let req = req.timeout(std::time::Duration::from_secs(30));
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
            Err(e) => {
                let hint = if e.to_string().contains("certificate") {
                    " (is --ca-file the cluster's CA, a node's <data_dir>/tls/ca.crt?)"
                } else {
                    ""
                };
                bail!("{method} {url}: {e}{hint}")
            }
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
        .unwrap_or_else(|| "https://127.0.0.1:8006".to_string());
    let token = saved
        .as_ref()
        .and_then(|c| c["token"].as_str().map(String::from));
    let ca_pem = match &cli.ca_file {
        Some(p) => {
            Some(std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))?)
        }
        None => saved
            .as_ref()
            .and_then(|c| c["ca_pem"].as_str().map(String::from)),
    };
    let client = Client {
        api: api.clone(),
        token,
        agent: agent(ca_pem.as_deref())?,
    };
    let out = |v: &Value, table: &dyn Fn(&Value)| match cli.output {
        Output::Json => println!("{}", serde_json::to_string_pretty(v).unwrap_or_default()),
        Output::Table => table(v),
    };
    match cli.cmd {
        Cmd::ApiEndpoints => {
            for e in ENDPOINTS {
                println!("{} {}", e.0, e.1);
            }
        }
        Cmd::Login { user } => {
            let password = read_line("password")?;
            let v = Client {
                api: api.clone(),
                token: None,
                agent: client.agent.clone(),
            }
            .call(
                LOGIN,
                &[],
                Some(json!({ "username": user, "password": password })),
            )?;
            let token = v["token"]
                .as_str()
                .context("no token in the login answer")?;
            save_credentials(&api, token, ca_pem.as_deref())?;
            out(&v, &|v| {
                println!("logged in to {api}");
                if v["must_change_password"] == true {
                    println!("the password must be changed first: tessera password");
                }
            });
        }
        Cmd::Logout => {
            let v = client.call(LOGOUT, &[], None)?;
            if let Ok(p) = credentials_path() {
                let _ = std::fs::remove_file(p);
            }
            out(&v, &|_| println!("logged out"));
        }
        Cmd::Password => {
            let (old, new) = (read_line("old password")?, read_line("new password")?);
            let v = client.call(
                PASSWORD,
                &[],
                Some(json!({ "old_password": old, "new_password": new })),
            )?;
            out(&v, &|_| println!("password changed"));
        }
        Cmd::Cluster(ClusterCmd::Status) => {
            let v = client.call(CLUSTER, &[], None)?;
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
            let v = client.call(NODES, &[], None)?;
            out(&v, &|v| {
                table(
                    v,
                    &[("ID", "id"), ("ADDRESS", "address"), ("STATE", "state")],
                )
            });
        }
        Cmd::Node(NodeCmd::Rm { id, force }) => {
            let q = if force { "?force=true" } else { "" };
            let v = client.call_q(NODE_RM, &[&id], q, None)?;
            out(&v, &|_| println!("removed node {id}"));
        }
        Cmd::Token(TokenCmd::Create { role, expires }) => {
            let v = client.call(
                TOKEN_CREATE,
                &[],
                Some(json!({ "role": role, "expires_in_s": expires })),
            )?;
            out(&v, &|v| {
                println!("id:    {}", v["id"].as_str().unwrap_or("-"));
                println!("token: {}", v["token"].as_str().unwrap_or("-"));
                println!("role:  {}", v["role"].as_str().unwrap_or("-"));
            });
        }
        Cmd::Token(TokenCmd::Rm { id }) => {
            let v = client.call(TOKEN_RM, &[&id], None)?;
            out(&v, &|_| println!("revoked {id}"));
        }
        Cmd::Volume(cmd) => volume(&client, cmd, &out)?,
        Cmd::Vm(cmd) => vm(&client, cmd, &out)?,
        Cmd::Network(NetworkCmd::Create {
            name,
            bridge,
            vlan,
            uplink,
        }) => {
            let v = client.call(
                NETWORK_CREATE,
                &[],
                Some(json!({ "name": name, "bridge": bridge, "vlan": vlan, "uplink": uplink })),
            )?;
            out(&v, &|_| println!("defined network {name}"));
        }
        Cmd::Network(NetworkCmd::Ls) => {
            let v = client.call(NETWORKS, &[], None)?;
            out(&v, &|v| {
                table(
                    v,
                    &[
                        ("NAME", "name"),
                        ("BRIDGE", "bridge"),
                        ("VLAN", "vlan"),
                        ("UPLINK", "uplink"),
                    ],
                )
            });
        }
        Cmd::Network(NetworkCmd::Rm { name }) => {
            let v = client.call(NETWORK_RM, &[&name], None)?;
            out(&v, &|_| println!("deleted network {name}"));
        }
        Cmd::Task(TaskCmd::Ls) => {
            let v = client.call(TASKS, &[], None)?;
            out(&v, &|v| {
                table(
                    v,
                    &[
                        ("ID", "id"),
                        ("STATE", "state"),
                        ("PROGRESS", "progress"),
                        ("USER", "user"),
                        ("OPERATION", "op.type"),
                    ],
                )
            });
        }
        Cmd::Task(TaskCmd::Show { id }) => {
            let v = client.call(TASK, &[&id], None)?;
            out(&v, &show_task);
        }
        Cmd::Task(TaskCmd::Watch { id }) => {
            let v = watch(&client, &id, matches!(cli.output, Output::Table))?;
            out(&v, &show_task);
            if v["state"] != "succeeded" {
                bail!(
                    "task {id} failed: {}",
                    v["error"].as_str().unwrap_or("no reason given")
                );
            }
        }
        Cmd::User(UserCmd::Ls) => {
            let v = client.call(USERS, &[], None)?;
            out(&v, &|v| {
                table(
                    v,
                    &[
                        ("USER", "username"),
                        ("ROLE", "role"),
                        ("MUST CHANGE PASSWORD", "must_change_password"),
                    ],
                )
            });
        }
        Cmd::User(UserCmd::Create { name, role }) => {
            let password = read_line("initial password")?;
            let v = client.call(
                USER_CREATE,
                &[],
                Some(json!({ "username": name, "password": password, "role": role })),
            )?;
            out(&v, &|_| println!("created user {name} ({role})"));
        }
        Cmd::User(UserCmd::SetRole { name, role }) => {
            let v = client.call(USER_SET, &[&name], Some(json!({ "role": role })))?;
            out(&v, &|_| println!("{name} is now {role}"));
        }
        Cmd::User(UserCmd::Rm { name }) => {
            let v = client.call(USER_RM, &[&name], None)?;
            out(&v, &|_| println!("deleted user {name}"));
        }
        Cmd::Event(EventCmd::Ls { limit }) => {
            let v = client.call_q(EVENTS, &[], &format!("?limit={limit}"), None)?;
            out(&v, &|v| {
                for e in v.as_array().into_iter().flatten() {
                    print_event(e);
                }
            });
        }
        Cmd::Event(EventCmd::Watch) => {
            let (_, req) = client.request(EVENT_STREAM, &[], "");
            let r = req
                .call()
                .map_err(|e| anyhow::anyhow!("GET {}: {e}", EVENT_STREAM.1))?;
            let reader = std::io::BufReader::new(r.into_reader());
            for line in reader.lines() {
                let line = line.context("reading the event stream")?;
                let Some(data) = line.strip_prefix("data:") else {
                    continue;
                };
                let e: Value = serde_json::from_str(data.trim()).unwrap_or(Value::Null);
                match cli.output {
                    Output::Json => println!("{e}"),
                    Output::Table => print_event(&e),
                }
                let _ = std::io::stdout().flush();
            }
        }
    }
    Ok(())
}

type Out<'a> = dyn Fn(&Value, &dyn Fn(&Value)) + 'a;

/// `a.b` looks into nested objects.
fn field(v: &Value, path: &str) -> String {
    let mut cur = v;
    for p in path.split('.') {
        cur = &cur[p];
    }
    match cur {
        Value::String(s) => s.clone(),
        Value::Null => "-".into(),
        Value::Array(a) => a
            .iter()
            .map(|x| {
                x.as_str()
                    .map(String::from)
                    .unwrap_or_else(|| x.to_string())
            })
            .collect::<Vec<_>>()
            .join(","),
        other => other.to_string(),
    }
}

/// Prints a list as aligned columns.
fn table(v: &Value, cols: &[(&str, &str)]) {
    let rows: Vec<Vec<String>> = v
        .as_array()
        .into_iter()
        .flatten()
        .map(|r| cols.iter().map(|(_, f)| field(r, f)).collect())
        .collect();
    let widths: Vec<usize> = cols
        .iter()
        .enumerate()
        .map(|(i, (h, _))| {
            rows.iter()
                .map(|r| r[i].len())
                .chain([h.len()])
                .max()
                .unwrap_or(0)
        })
        .collect();
    let line = |cells: Vec<String>| {
        let parts: Vec<String> = cells
            .iter()
            .zip(&widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect();
        println!("{}", parts.join("  ").trim_end());
    };
    line(cols.iter().map(|(h, _)| h.to_string()).collect());
    for r in rows {
        line(r);
    }
}

/// Milliseconds since the epoch as `YYYY-MM-DD HH:MM:SS` UTC.
fn utc(ms: &Value) -> String {
    let Some(ms) = ms.as_u64() else {
        return "-".into();
    };
    let (days, secs) = ((ms / 1000) / 86400, (ms / 1000) % 86400);
    // Howard Hinnant's civil-from-days.
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02}",
        secs / 3600,
        secs % 3600 / 60,
        secs % 60
    )
}

fn print_event(e: &Value) {
    println!(
        "{}  {:<18} {:<24} {:<10} {}",
        utc(&e["time_ms"]),
        field(e, "kind"),
        field(e, "target"),
        field(e, "user"),
        field(e, "message")
    );
}

fn show_task(v: &Value) {
    println!("task:     {}", field(v, "id"));
    println!("state:    {}", field(v, "state"));
    println!("progress: {}%", field(v, "progress"));
    println!("node:     {}", field(v, "node"));
    if let Some(e) = v["error"].as_str() {
        println!("error:    {e}");
    }
    for l in v["log"].as_array().into_iter().flatten() {
        println!("  {}  {}", utc(&l["time_ms"]), field(l, "message"));
    }
}

/// Polls a task until it ends; with `bar`, draws its progress on standard error.
fn watch(client: &Client, id: &str, bar: bool) -> anyhow::Result<Value> {
    let started = std::time::Instant::now();
    loop {
        let v = client.call(TASK, &[id], None)?;
        let state = v["state"].as_str().unwrap_or("?").to_string();
        let pct = v["progress"].as_u64().unwrap_or(0).min(100) as usize;
        if bar {
            let filled = pct * 30 / 100;
            eprint!(
                "\r[{}{}] {pct:>3}% {state:<10}",
                "#".repeat(filled),
                " ".repeat(30 - filled)
            );
        }
        if state == "succeeded" || state == "failed" {
            if bar {
                eprintln!();
            }
            return Ok(v);
        }
        if started.elapsed() > std::time::Duration::from_secs(3600) {
            bail!("task {id} is still {state} after an hour; it goes on (tessera task watch {id})");
        }
        std::thread::sleep(std::time::Duration::from_millis(250));
    }
}

/// Waits for the task in `v` (a task record) unless `no_wait`; fails if it fails.
fn follow(client: &Client, v: Value, no_wait: bool, bar: bool) -> anyhow::Result<Value> {
    let id = v["id"]
        .as_str()
        .context("no task id in the answer")?
        .to_string();
    if no_wait {
        return Ok(v);
    }
    let t = watch(client, &id, bar)?;
    if t["state"] != "succeeded" {
        bail!(
            "task {id} failed: {}",
            t["error"].as_str().unwrap_or("no reason given")
        );
    }
    Ok(t)
}

fn volume(client: &Client, cmd: VolumeCmd, out: &Out) -> anyhow::Result<()> {
    let bar = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let done = |v: &Value| println!("task {} {}", field(v, "id"), field(v, "state"));
    match cmd {
        VolumeCmd::Create {
            name,
            size,
            node,
            no_wait,
        } => {
            let v = client.call(
                VOLUME_CREATE,
                &[],
                Some(json!({ "name": name, "size_bytes": size, "node": node })),
            )?;
            out(&follow(client, v, no_wait, bar)?, &done);
        }
        VolumeCmd::Ls => {
            let v = client.call(VOLUMES, &[], None)?;
            out(&v, &|v| {
                table(
                    v,
                    &[
                        ("NAME", "name"),
                        ("SIZE", "size_bytes"),
                        ("STATE", "state"),
                        ("NODE", "node"),
                        ("ORIGIN", "origin"),
                        ("VM", "attached_to"),
                        ("NBD", "nbd"),
                    ],
                )
            });
        }
        VolumeCmd::Show { name } => {
            let v = client.call(VOLUME, &[&name], None)?;
            out(&v, &|v| {
                for f in [
                    "name",
                    "size_bytes",
                    "state",
                    "node",
                    "origin",
                    "attached_to",
                    "nbd",
                ] {
                    println!("{f:<12} {}", field(v, f));
                }
                for s in v["snapshots"].as_array().into_iter().flatten() {
                    println!("snapshot     {} ({})", field(s, "name"), field(s, "state"));
                }
            });
        }
        VolumeCmd::Snapshot {
            volume,
            snapshot,
            no_wait,
        } => {
            let v = client.call(
                SNAPSHOT_CREATE,
                &[&volume],
                Some(json!({ "name": snapshot })),
            )?;
            out(&follow(client, v, no_wait, bar)?, &done);
        }
        VolumeCmd::SnapshotRm {
            volume,
            snapshot,
            no_wait,
        } => {
            let v = client.call(SNAPSHOT_RM, &[&volume, &snapshot], None)?;
            out(&follow(client, v, no_wait, bar)?, &done);
        }
        VolumeCmd::Clone {
            volume,
            snapshot,
            name,
            no_wait,
        } => {
            let v = client.call(
                CLONE,
                &[&volume],
                Some(json!({ "snapshot": snapshot, "name": name })),
            )?;
            out(&follow(client, v, no_wait, bar)?, &done);
        }
        VolumeCmd::Rm { name, no_wait } => {
            let v = client.call(VOLUME_RM, &[&name], None)?;
            out(&follow(client, v, no_wait, bar)?, &done);
        }
    }
    Ok(())
}

fn mib(bytes: u64) -> anyhow::Result<u64> {
    if bytes % (1 << 20) != 0 {
        bail!("memory must be a whole number of MiB");
    }
    Ok(bytes >> 20)
}

fn vm(client: &Client, cmd: VmCmd, out: &Out) -> anyhow::Result<()> {
    let show = |v: &Value| {
        for f in [
            "name",
            "vcpus",
            "memory_mib",
            "disks",
            "networks",
            "kernel",
            "cmdline",
            "node",
            "desired_state",
            "actual_state",
            "generation",
        ] {
            println!("{f:<14} {}", field(v, f));
        }
    };
    match cmd {
        VmCmd::Create {
            name,
            vcpus,
            memory,
            disks,
            networks,
            kernel,
            cmdline,
            node,
        } => {
            let v = client.call(
                VM_CREATE,
                &[],
                Some(json!({
                    "name": name, "vcpus": vcpus, "memory_mib": mib(memory)?, "disks": disks,
                    "networks": networks, "kernel": kernel, "cmdline": cmdline, "node": node,
                })),
            )?;
            out(&v, &show);
        }
        VmCmd::Ls => {
            let v = client.call(VMS, &[], None)?;
            out(&v, &|v| {
                table(
                    v,
                    &[
                        ("NAME", "name"),
                        ("VCPUS", "vcpus"),
                        ("MEMORY_MIB", "memory_mib"),
                        ("DISKS", "disks"),
                        ("DESIRED", "desired_state"),
                        ("ACTUAL", "actual_state"),
                    ],
                )
            });
        }
        VmCmd::Show { name } => {
            let v = client.call(VM, &[&name], None)?;
            out(&v, &show);
        }
        VmCmd::Set {
            name,
            vcpus,
            memory,
            disks,
            desired_state,
        } => {
            let mut body = serde_json::Map::new();
            if let Some(c) = vcpus {
                body.insert("vcpus".into(), json!(c));
            }
            if let Some(m) = memory {
                body.insert("memory_mib".into(), json!(mib(m)?));
            }
            if let Some(d) = disks {
                body.insert("disks".into(), json!(d));
            }
            if let Some(s) = desired_state {
                body.insert("desired_state".into(), json!(s));
            }
            let v = client.call(VM_SET, &[&name], Some(Value::Object(body)))?;
            out(&v, &show);
        }
        VmCmd::Rm { name } => {
            let v = client.call(VM_RM, &[&name], None)?;
            out(&v, &|_| println!("deleted VM {name}"));
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

    #[test]
    fn times_are_utc() {
        let t = serde_json::json!(1_764_028_800_123u64);
        assert_eq!(super::utc(&t), "2025-11-25 00:00:00");
        assert_eq!(super::utc(&serde_json::json!(0)), "1970-01-01 00:00:00");
    }

    #[test]
    fn sizes_parse() {
        assert_eq!(super::parse_size("10G"), Ok(10 << 30));
        assert_eq!(super::parse_size("512MiB"), Ok(512 << 20));
        assert_eq!(super::parse_size("4096"), Ok(4096));
        assert!(super::parse_size("big").is_err());
        assert!(super::parse_size("99999999999T").is_err());
    }

    #[test]
    fn path_parameters_are_filled_and_encoded() {
        assert_eq!(
            super::fill(
                "/api/v1/volumes/{name}/snapshots/{snapshot}",
                &["a b", "s/1"]
            ),
            "/api/v1/volumes/a%20b/snapshots/s%2F1"
        );
    }
}
