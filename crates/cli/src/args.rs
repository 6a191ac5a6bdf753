//! The command line: every subcommand and option (clap), and the parsers of its values.

use std::path::PathBuf;

use clap::{Parser, Subcommand};

use tessera_api::{DesiredState, RestartPolicy, Role};
use tessera_units::parse_size;

use crate::output::Output;

mod cp;
mod node;
pub use cp::{CpArgs, FileFormat};
pub use node::NodeCmd;

#[derive(Parser)]
#[command(
    name = "tessera",
    version,
    about = "Command-line client of the Tessera REST API"
)]
pub struct Cli {
    /// API base address, e.g. https://10.0.0.11:8006 (default: the one used at login).
    #[arg(long, global = true, env = "TESSERA_API")]
    pub api: Option<String>,
    /// Output format: tables for people (`wide` adds ids), JSON as the API answers it.
    #[arg(long, global = true, value_enum, default_value_t = Output::Table)]
    pub output: Output,
    /// The cluster CA certificate to check the API's HTTPS with (a node's
    /// `<data_dir>/tls/ca.crt`); remembered at login.
    #[arg(long, global = true, env = "TESSERA_CA_FILE")]
    pub ca_file: Option<PathBuf>,
    #[command(subcommand)]
    pub cmd: Cmd,
}

#[derive(Subcommand)]
pub enum Cmd {
    /// Log in and store the session token (password prompted on a terminal, else read
    /// from standard input).
    Login {
        /// User name: name (of the default realm) or name@realm. When the server asks
        /// for a second factor, its code is prompted too (or read from the next line of
        /// standard input).
        #[arg(long, default_value = "admin")]
        user: String,
    },
    /// Change the password (prompted on a terminal; else old and new password on two
    /// lines of standard input).
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
    /// Boot images (kernel, initramfs, command line) kept by the cluster.
    #[command(subcommand)]
    Image(ImageCmd),
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
    /// Realms: LDAP directories users log in from as user@realm (administrators only).
    #[command(subcommand)]
    Realm(RealmCmd),
    /// Seed configuration, made here without the API.
    #[command(subcommand)]
    Seed(SeedCmd),
    /// The API and web console's own certificate (administrators).
    #[command(subcommand)]
    Certificate(CertificateCmd),
    /// Print the API operations this client uses (method and OpenAPI path), one per line.
    #[command(hide = true)]
    ApiEndpoints,
}

#[derive(Subcommand)]
pub enum CertificateCmd {
    /// Install a certificate for the API and web console on every node (served for the
    /// names it covers; the cluster CA's certificate for other names and addresses).
    Install {
        /// PEM file: the certificate, then each issuer in order.
        #[arg(long)]
        cert: std::path::PathBuf,
        /// PEM file: its private key.
        #[arg(long)]
        key: std::path::PathBuf,
    },
    /// Show the installed certificate (never its key).
    Show,
    /// Remove it: every node serves its cluster-CA certificate again.
    Remove,
}

#[derive(Subcommand)]
pub enum SeedCmd {
    /// Print a new join secret (32 random letters and digits, 190 bits) for every node's
    /// seed.toml.
    New,
}

#[derive(Subcommand)]
pub enum ClusterCmd {
    /// Leader, term and members.
    Status,
    /// The cluster's settings.
    Settings,
    /// Change the cluster's settings (administrators).
    Set {
        /// vCPUs placed per physical CPU of a node, 1-64 (1: no overcommit). Memory is
        /// never overcommitted.
        #[arg(long)]
        vcpu_overcommit: Option<f64>,
        /// Seconds a copy of a replicated volume may stay away (its node down or its
        /// store unreachable) before it is rebuilt on another node (1-2592000).
        #[arg(long, value_name = "SECONDS")]
        replica_replace_after: Option<u64>,
    },
}

#[derive(Subcommand)]
pub enum TokenCmd {
    /// Create an API token.
    Create {
        /// auditor, operator or administrator (capped at your own role).
        #[arg(long, default_value = "auditor", value_parser = parse_role)]
        role: Role,
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

#[derive(Subcommand)]
pub enum VolumeCmd {
    /// Create a volume (waits for its task unless --no-wait).
    Create {
        /// Name.
        name: String,
        /// Size, e.g. 10G, 512M, 1T (binary units) or bytes.
        #[arg(long, value_parser = parse_size)]
        size: u64,
        /// Node (name or id) whose store holds it, for several copies the primary's
        /// (default: the node you talk to; several copies: the nodes with most free space).
        #[arg(long)]
        node: Option<String>,
        /// Copies on distinct nodes, 1-3 (default: 3 when at least three nodes are up
        /// with a healthy store, else as many as there are).
        #[arg(long)]
        replicas: Option<u8>,
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
    /// Let a replicated volume's primary write with fewer than 2 copies in sync
    /// (administrators; recorded with your name and reason as event volume.override).
    /// Without it, a volume whose in-sync copies would drop below 2 stops taking writes
    /// until a copy is back. Cleared by the cluster once 2 copies are in sync again.
    Override {
        /// Volume.
        name: String,
        /// Why (kept in the volume record and the event).
        #[arg(long)]
        reason: String,
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
    /// Grow a volume (one copy only for now; a running VM sees the new size after its
    /// next start).
    Resize {
        /// Name.
        name: String,
        /// New size, e.g. 20G, 512M or bytes; not below the current size.
        #[arg(long, value_parser = parse_size)]
        size: u64,
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
    /// Copy between a volume and a local raw or qcow2 file (or two volumes) over the QUIC
    /// export, skipping ranges that read as zeros, with a progress bar on a terminal;
    /// `--resume` continues an interrupted copy.
    Cp(CpArgs),
    /// Write a client certificate and key for NBD over TLS (Operator role) into a
    /// directory, as qemu (tls-creds-x509) and libnbd (tls-certificates=DIR) read them.
    ExportCreds {
        /// Directory to write ca-cert.pem, client-cert.pem and client-key.pem into
        /// (created private if missing).
        #[arg(long)]
        dir: std::path::PathBuf,
    },
}

#[derive(Subcommand)]
pub enum VmCmd {
    /// Define a VM.
    Create {
        /// Name.
        name: String,
        /// Virtual CPUs (default 1, or the template's).
        #[arg(long)]
        vcpus: Option<u32>,
        /// Memory, e.g. 512M, 2G (default 512M, or the template's).
        #[arg(long, value_parser = parse_size)]
        memory: Option<u64>,
        /// A volume to attach (repeat for more; the first boots).
        #[arg(long = "disk")]
        disks: Vec<String>,
        /// A network to attach a NIC to (repeat for more), its MAC assigned.
        #[arg(long = "network", conflicts_with = "nics")]
        networks: Vec<String>,
        /// A NIC: `NETWORK` or `NETWORK,mac=xx:xx:xx:xx:xx:xx` (repeat for more, in
        /// order); without a MAC the cluster assigns one.
        #[arg(long = "nic", value_parser = parse_nic)]
        nics: Vec<tessera_api::NewNic>,
        /// Kernel image path on the node.
        #[arg(long)]
        kernel: Option<String>,
        /// A boot image to boot (see `tessera image`), instead of --kernel.
        #[arg(long, conflicts_with = "kernel")]
        image: Option<String>,
        /// A template to copy: its spec (vCPUs, memory and what else is not given) and
        /// copy-on-write clones of its disks.
        #[arg(long, conflicts_with = "disks")]
        from: Option<String>,
        /// Kernel command line.
        #[arg(long)]
        cmdline: Option<String>,
        /// Pin to a node (name or id).
        #[arg(long)]
        node: Option<String>,
        /// never, on-crash (default) or always.
        #[arg(long, value_parser = parse_restart_policy)]
        restart_policy: Option<RestartPolicy>,
        /// Seconds a stop waits for the guest to shut down before forcing it (1-3600;
        /// default 30).
        #[arg(long)]
        stop_timeout: Option<u32>,
        /// High availability: restarted on another node when its node fails.
        #[arg(long)]
        ha: bool,
        /// Restart priority among HA VMs, 0-1000 (higher first; default 0).
        #[arg(long)]
        priority: Option<u32>,
    },
    /// Make a stopped VM a template (it can no longer start; `vm create --from` copies it).
    Template {
        /// Name.
        name: String,
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
        /// stopped, running or paused.
        #[arg(long, value_parser = parse_desired_state)]
        desired_state: Option<DesiredState>,
        /// never, on-crash or always.
        #[arg(long, value_parser = parse_restart_policy)]
        restart_policy: Option<RestartPolicy>,
        /// Seconds a stop waits for the guest to shut down before forcing it (1-3600);
        /// the next stop uses it.
        #[arg(long)]
        stop_timeout: Option<u32>,
        /// High availability on (true) or off (false).
        #[arg(long)]
        ha: Option<bool>,
        /// Restart priority among HA VMs, 0-1000 (higher first).
        #[arg(long)]
        priority: Option<u32>,
    },
    /// Delete a VM definition (its volumes stay).
    Rm {
        /// Name.
        name: String,
    },
    /// Start a VM (placed on a node with room) and wait until it runs.
    Start(VmAction),
    /// Stop a VM (the guest's power button, forced after its stop timeout) and wait until
    /// it is stopped.
    Stop(VmAction),
    /// Kill a VM's VMM at once.
    Kill(VmAction),
    /// Reboot a VM on its node.
    Reboot(VmAction),
    /// Pause a running VM.
    Pause(VmAction),
    /// Resume a paused VM.
    Resume(VmAction),
    /// Attach to a VM's serial console (ask the node it runs on; Ctrl-] leaves).
    Console {
        /// Name.
        name: String,
    },
    /// Move a running VM to another node without stopping it (live migration) and wait
    /// until it runs there; a failure leaves it running where it was.
    Migrate {
        /// Name.
        name: String,
        /// The target node (name or id); without it the scheduler picks one.
        #[arg(long)]
        to: Option<String>,
        /// The longest pause of the guest for the last copy, in ms (1-60000; default 50).
        #[arg(long)]
        downtime_ms: Option<u64>,
        /// A cap on the memory sent per second, in KiB.
        #[arg(long)]
        max_bandwidth_kib_s: Option<u64>,
        /// Cancel the migration under way instead (the VM keeps running where it is).
        #[arg(long, conflicts_with_all = ["to", "downtime_ms", "max_bandwidth_kib_s"])]
        cancel: bool,
        /// Return once the request is accepted.
        #[arg(long)]
        no_wait: bool,
    },
}

#[derive(Subcommand)]
pub enum ImageCmd {
    /// Upload a boot image; every node then fetches and checks its own copy.
    Upload {
        /// Name.
        name: String,
        /// The kernel file (bzImage or ELF vmlinux).
        #[arg(long)]
        kernel: std::path::PathBuf,
        /// The initramfs file.
        #[arg(long)]
        initrd: Option<std::path::PathBuf>,
        /// The default kernel command line of VMs booting it.
        #[arg(long)]
        cmdline: Option<String>,
    },
    /// List boot images.
    Ls,
    /// Delete a boot image (refused while a VM names it).
    Rm {
        /// Name.
        name: String,
    },
}

#[derive(clap::Args)]
pub struct VmAction {
    /// Name.
    pub name: String,
    /// Return once the request is accepted.
    #[arg(long)]
    pub no_wait: bool,
}

#[derive(Subcommand)]
pub enum NetworkCmd {
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
pub enum TaskCmd {
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
pub enum UserCmd {
    /// List users.
    Ls,
    /// Create a user (initial password prompted on a terminal, else read from standard
    /// input; it must be changed at first login).
    Create {
        /// User name.
        name: String,
        /// auditor, operator or administrator.
        #[arg(long, value_parser = parse_role)]
        role: Role,
    },
    /// Change a user's role.
    SetRole {
        /// User name.
        name: String,
        /// auditor, operator or administrator.
        #[arg(value_parser = parse_role)]
        role: Role,
    },
    /// Delete a user.
    Rm {
        /// User name.
        name: String,
    },
    /// Remove a user's authenticator (TOTP), e.g. one who lost its phone and recovery
    /// codes; its next login needs the password only.
    RmTotp {
        /// User name (name@realm for a directory user).
        name: String,
    },
}

#[derive(Subcommand)]
pub enum EventCmd {
    /// The latest events.
    Ls {
        /// How many.
        #[arg(long, default_value_t = 50)]
        limit: usize,
        /// Only events by this user (or about its logins), e.g. alice@corp.
        #[arg(long)]
        user: Option<String>,
    },
    /// Follow events as they happen (Ctrl-C stops).
    Watch,
}

#[derive(Subcommand)]
pub enum RealmCmd {
    /// List realms.
    Ls,
    /// Show a realm's settings (never its bind password).
    Show {
        /// Realm name.
        name: String,
    },
    /// Create a realm from a JSON file of its settings (`-`: standard input).
    Create {
        /// The settings, as docs/users.md shows.
        #[arg(long)]
        file: PathBuf,
    },
    /// Replace a realm's settings (without bind_password the stored one is kept).
    Set {
        /// Realm name.
        name: String,
        /// The settings, as docs/users.md shows.
        #[arg(long)]
        file: PathBuf,
    },
    /// Delete a realm (its users' sessions end).
    Rm {
        /// Realm name.
        name: String,
    },
    /// Bind and show what a user would get (DN, groups, role); saves nothing.
    Test {
        /// Realm name.
        name: String,
        /// The login name within the realm.
        user: String,
        /// Also check the user's password (prompted, else read from standard input).
        #[arg(long)]
        with_password: bool,
    },
    /// Check the realm's users against the directory now; those whose role changed or
    /// who lost access have their sessions ended.
    Sync {
        /// Realm name.
        name: String,
    },
    /// Show the login policy: the default realm, who must use a second factor.
    Policy,
    /// Replace the login policy (what is not given goes back to its default).
    SetPolicy {
        /// The realm of login names without @realm (default local).
        #[arg(long, default_value = "local")]
        default_realm: String,
        /// A realm whose users must log in with a second factor (repeat for more).
        #[arg(long)]
        two_factor_realm: Vec<String>,
        /// A role whose holders must log in with a second factor (repeat for more).
        #[arg(long, value_parser = parse_role)]
        two_factor_role: Vec<Role>,
    },
}

/// Durations: seconds, or a number with s, m, h, d.
pub fn parse_duration(s: &str) -> Result<u64, String> {
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

pub fn parse_on_off(s: &str) -> Result<bool, String> {
    match s {
        "on" => Ok(true),
        "off" => Ok(false),
        _ => Err(format!("{s:?} is neither on nor off")),
    }
}

pub fn parse_role(s: &str) -> Result<Role, String> {
    api_word(s).ok_or_else(|| format!("{s:?} is not a role (auditor, operator or administrator)"))
}

pub fn parse_desired_state(s: &str) -> Result<DesiredState, String> {
    api_word(s).ok_or_else(|| format!("{s:?} is not a state (stopped, running or paused)"))
}

pub fn parse_restart_policy(s: &str) -> Result<RestartPolicy, String> {
    api_word(s).ok_or_else(|| format!("{s:?} is not a restart policy (never, on-crash or always)"))
}

/// An API enum from the word the API spells it with.
fn api_word<T: serde::de::DeserializeOwned>(s: &str) -> Option<T> {
    serde_json::from_value(serde_json::Value::String(s.to_string())).ok()
}

/// `--nic NETWORK[,mac=MAC]`.
fn parse_nic(s: &str) -> Result<tessera_api::NewNic, String> {
    let mut parts = s.split(',');
    let network = parts.next().unwrap_or_default().to_string();
    if network.is_empty() || network.contains('=') {
        return Err(format!("{s:?}: expected NETWORK[,mac=MAC]"));
    }
    let mut mac = None;
    for p in parts {
        match p.split_once('=') {
            Some(("mac", m)) if mac.is_none() && !m.is_empty() => mac = Some(m.to_string()),
            _ => return Err(format!("{s:?}: expected NETWORK[,mac=MAC]")),
        }
    }
    Ok(tessera_api::NewNic { network, mac })
}

#[cfg(test)]
mod tests;
