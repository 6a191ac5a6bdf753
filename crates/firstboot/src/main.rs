//! `tessera-firstboot`: the node image's seed on the running node. `apply` (first boot)
//! copies the seed partition's `seed.toml` to `/etc/tessera` and sets the host name and
//! the management network's networkd file; `network` (every boot) sets a static seed's
//! address and route through netlink; `tesserad-seed` (before each `tesserad` start) writes
//! `tesserad`'s seed with the address the management interface has; `check` shows what a
//! seed becomes; `issue` writes the console's status screen; `upgrade-apply` and
//! `boot-check` are the node's side of an A/B upgrade (`upgrade.rs`); `data-format`
//! checks the data partition's format before the daemons start (`data_format`).

#![forbid(unsafe_code)]

use std::io::{BufRead, BufReader, Write};
use std::net::IpAddr;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::{Parser, Subcommand};
use tessera_firstboot::data_format::{self, Decision};
use tessera_firstboot::issue::{self, Screen};
use tessera_firstboot::node_seed::NodeSeed;
use tessera_firstboot::render;

mod upgrade;

#[derive(Parser)]
#[command(
    name = "tessera-firstboot",
    version,
    about = "Applies a Tessera node image's seed"
)]
struct Cli {
    /// The system's configuration directory (another one for tests and image builds).
    #[arg(long, global = true, default_value = "/etc")]
    etc: PathBuf,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// First boot: check the seed, keep a private copy, set the host name and the
    /// management network. Does nothing once applied.
    Apply {
        /// The seed partition's seed file.
        #[arg(long, default_value = "/run/tessera-seed/seed.toml")]
        from: PathBuf,
    },
    /// Set a static seed's management address and default route on the management
    /// interface through netlink (every boot, before tesserad): added when missing,
    /// corrected when different, nothing else touched. A DHCP seed's are networkd's.
    Network,
    /// Write tesserad's seed (<etc>/tessera/seed.toml) with the management interface's
    /// current address, waiting for one (DHCP) up to --wait-secs.
    TesseradSeed {
        #[arg(long, default_value_t = 120)]
        wait_secs: u64,
        /// tesserad's data directory (the data partition's mount point).
        #[arg(long, default_value = render::DATA_DIR)]
        data_dir: String,
    },
    /// Check a seed file and print the network file and tesserad seed it gives.
    Check {
        /// The seed file.
        seed: PathBuf,
        /// The management interface to assume (default: the seed's, else eth0).
        #[arg(long)]
        interface: Option<String>,
        /// The address to assume for a DHCP seed.
        #[arg(long, default_value = "192.0.2.1")]
        address: IpAddr,
        /// The host name to assume when the seed names none.
        #[arg(long, default_value = "tessera-node")]
        hostname: String,
    },
    /// Write the console's status screen (/etc/issue) from tesserad's status socket.
    Issue {
        #[arg(long, default_value = "/var/lib/tessera")]
        data_dir: PathBuf,
        #[arg(long, default_value = "/etc/issue")]
        out: PathBuf,
    },
    /// Write the root file system tesserad received (<dir>/root.img, <dir>/request.json)
    /// to the root slot that is not running, give it a boot entry on trial and reboot into
    /// it (tessera-upgrade.service).
    UpgradeApply {
        #[arg(long, default_value = "/var/lib/tessera/upgrade")]
        dir: PathBuf,
        /// The EFI system partition's mount point.
        #[arg(long, default_value = "/efi")]
        esp: PathBuf,
    },
    /// Check the data partition's format before tessera-store and tesserad start (every
    /// boot, tessera-data-format.service): record it on a new partition; fail, naming
    /// both releases, when a newer release wrote it than this one reads.
    DataFormat {
        #[arg(long, default_value = "/var/lib/tessera")]
        data_dir: PathBuf,
    },
    /// Wait until this node is healthy (every boot, before boot-complete.target): a slot
    /// on trial is marked good only then; one that does not get there reboots, so that
    /// the boot loader counts the failed boot (tessera-boot-check.service).
    BootCheck {
        #[arg(long, default_value = "/var/lib/tessera")]
        data_dir: PathBuf,
        #[arg(long, default_value_t = 600)]
        within_secs: u64,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let res = match cli.cmd {
        Cmd::Apply { from } => apply(&cli.etc, &from),
        Cmd::Network => apply_network(&cli.etc),
        Cmd::TesseradSeed {
            wait_secs,
            data_dir,
        } => write_tesserad_seed(&cli.etc, wait_secs, &data_dir),
        Cmd::Check {
            seed,
            interface,
            address,
            hostname,
        } => check(&seed, interface, address, &hostname),
        Cmd::Issue { data_dir, out } => write_issue(&cli.etc, &data_dir, &out),
        Cmd::UpgradeApply { dir, esp } => upgrade::apply(&dir, &esp),
        Cmd::DataFormat { data_dir } => check_data_format(&cli.etc, &data_dir),
        Cmd::BootCheck {
            data_dir,
            within_secs,
        } => upgrade::boot_check(
            &data_dir.join("upgrade"),
            &data_dir,
            Duration::from_secs(within_secs),
        ),
    };
    match res {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn node_seed_path(etc: &Path) -> PathBuf {
    etc.join("tessera/node-seed.toml")
}

fn load(path: &Path) -> anyhow::Result<(String, NodeSeed)> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let origin = path.display().to_string();
    let seed = NodeSeed::parse(&text, &origin)?;
    render::check_cluster_fields(&seed, &origin)?;
    Ok((text, seed))
}

/// Writes `text` to `path` through a temporary file and a rename, with `mode` from the
/// first byte on (the join secret is never readable by others, not even briefly).
fn write_file(path: &Path, text: &str, mode: u32) -> anyhow::Result<()> {
    let dir = path.parent().context("a file path has a directory")?;
    let tmp = dir.join(format!(
        ".{}.new",
        path.file_name().and_then(|n| n.to_str()).unwrap_or("file")
    ));
    let _ = std::fs::remove_file(&tmp);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(&tmp)
        .with_context(|| format!("creating {}", tmp.display()))?;
    f.write_all(text.as_bytes())?;
    f.sync_all()?;
    std::fs::rename(&tmp, path).with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}

/// `<etc>/tessera`: root only (docs/security.md: the seed holds the join secret).
fn private_dir(etc: &Path) -> anyhow::Result<PathBuf> {
    let dir = etc.join("tessera");
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(&dir)
        .with_context(|| format!("creating {}", dir.display()))?;
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700))?;
    Ok(dir)
}

fn apply(etc: &Path, from: &Path) -> anyhow::Result<()> {
    let kept = node_seed_path(etc);
    if kept.exists() {
        println!("seed already applied ({} exists)", kept.display());
        return Ok(());
    }
    let (text, seed) = match load(from) {
        Ok(s) => s,
        Err(e) => {
            // The console is where someone at the machine looks: say it there too.
            let screen = format!(
                "\nTessera node: the seed cannot be used\n\n  {e:#}\n\n  Fix seed.toml on the TESSERASEED partition and reboot.\n\n"
            );
            let _ = write_file(&etc.join("issue"), &screen.replace('\\', "\\\\"), 0o644);
            return Err(e);
        }
    };
    let interface = interface_of(&seed)?;
    let hostname = match &seed.hostname {
        Some(h) => h.clone(),
        None => default_hostname(etc)?,
    };
    private_dir(etc)?;
    write_file(&kept, &text, 0o600)?;
    write_file(&etc.join("hostname"), &format!("{hostname}\n"), 0o644)?;
    if etc == Path::new("/") || etc == Path::new("/etc") {
        nix::unistd::sethostname(&hostname).context("setting the host name")?;
    }
    let network_dir = etc.join("systemd/network");
    std::fs::create_dir_all(&network_dir)?;
    write_file(
        &network_dir.join("10-tessera-management.network"),
        &render::networkd(&seed, &interface),
        0o644,
    )?;
    let conf_dir = etc.join("systemd/networkd.conf.d");
    std::fs::create_dir_all(&conf_dir)?;
    write_file(
        &conf_dir.join("10-tessera.conf"),
        render::NETWORKD_CONF,
        0o644,
    )?;
    println!("seed applied: host name {hostname}, management interface {interface}");
    Ok(())
}

/// `network`: a static seed's address and route, applied through netlink
/// (tessera_hostnet::management); fails naming what could not be set.
fn apply_network(etc: &Path) -> anyhow::Result<()> {
    let (_, seed) = load(&node_seed_path(etc))?;
    let interface = interface_of(&seed)?;
    let Some(def) = render::management(&seed, &interface) else {
        println!("{interface}: DHCP; systemd-networkd's DHCP client sets its address");
        return Ok(());
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the netlink runtime")?;
    let report = rt
        .block_on(tessera_hostnet::management::apply(&def))
        .context("reading the network interfaces")?;
    for c in &report.changes {
        println!("{interface}: {c}");
    }
    if report.changes.is_empty() && report.complete() {
        println!("{interface}: already as the seed says");
    }
    if !report.complete() {
        let why: Vec<String> = report.problems.iter().map(ToString::to_string).collect();
        bail!("{interface}: {}", why.join("; "));
    }
    Ok(())
}

/// The seed's interface, or the first Ethernet interface with a device behind it (not a
/// bridge, tap or veth), by name.
fn interface_of(seed: &NodeSeed) -> anyhow::Result<String> {
    if let Some(i) = &seed.network.interface {
        return Ok(i.clone());
    }
    let mut names: Vec<String> = std::fs::read_dir("/sys/class/net")
        .context("listing /sys/class/net")?
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| {
            let base = Path::new("/sys/class/net").join(n);
            base.join("device").exists()
                && std::fs::read_to_string(base.join("type")).is_ok_and(|t| t.trim() == "1")
        })
        .collect();
    names.sort();
    names
        .into_iter()
        .next()
        .context("no Ethernet interface found: name one in seed.toml ([network] interface)")
}

fn default_hostname(etc: &Path) -> anyhow::Result<String> {
    let id = std::fs::read_to_string(etc.join("machine-id")).context("reading the machine id")?;
    let id: String = id.trim().chars().take(8).collect();
    if id.len() < 8 {
        bail!("no machine id yet to name the node after");
    }
    Ok(format!("tessera-{id}"))
}

/// The first address of `interface` (IPv4 before IPv6, no link-local ones).
fn address_of(interface: &str) -> anyhow::Result<Option<IpAddr>> {
    let mut v6 = None;
    for ifa in nix::ifaddrs::getifaddrs().context("listing addresses")? {
        if ifa.interface_name != interface {
            continue;
        }
        let Some(addr) = ifa.address else { continue };
        if let Some(sin) = addr.as_sockaddr_in() {
            return Ok(Some(IpAddr::V4(
                std::net::SocketAddrV4::from(*sin).ip().to_owned(),
            )));
        }
        if let Some(sin6) = addr.as_sockaddr_in6() {
            let ip = std::net::SocketAddrV6::from(*sin6).ip().to_owned();
            if (ip.segments()[0] & 0xffc0) != 0xfe80 {
                v6.get_or_insert(IpAddr::V6(ip));
            }
        }
    }
    Ok(v6)
}

/// The one line of `<etc>/<file>` (trimmed), or `default` when it is missing or empty.
fn etc_line(etc: &Path, file: &str, default: &str) -> String {
    std::fs::read_to_string(etc.join(file))
        .map(|h| h.trim().to_string())
        .ok()
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| default.to_string())
}

fn hostname_of(etc: &Path) -> String {
    etc_line(etc, "hostname", "tessera")
}

fn write_tesserad_seed(etc: &Path, wait_secs: u64, data_dir: &str) -> anyhow::Result<()> {
    let (_, seed) = load(&node_seed_path(etc))?;
    let interface = interface_of(&seed)?;
    let address = match seed.static_address() {
        Some(c) => c.ip,
        None => {
            let deadline = Instant::now() + Duration::from_secs(wait_secs);
            loop {
                if let Some(ip) = address_of(&interface)? {
                    break ip;
                }
                if Instant::now() > deadline {
                    bail!("{interface} has no address after {wait_secs} s (is DHCP answering?)");
                }
                std::thread::sleep(Duration::from_millis(500));
            }
        }
    };
    let out = private_dir(etc)?.join("seed.toml");
    let text = render::tesserad_seed(
        &seed,
        &hostname_of(etc),
        &interface,
        address,
        data_dir,
        &out.display().to_string(),
    )?;
    write_file(&out, &text, 0o600)?;
    println!(
        "{} written: management address {address} on {interface}",
        out.display()
    );
    Ok(())
}

fn check(
    path: &Path,
    interface: Option<String>,
    address: IpAddr,
    hostname: &str,
) -> anyhow::Result<()> {
    let (_, seed) = load(path)?;
    let interface = interface
        .or_else(|| seed.network.interface.clone())
        .unwrap_or_else(|| "eth0".to_string());
    let address = seed.static_address().map_or(address, |c| c.ip);
    let hostname = seed
        .hostname
        .clone()
        .unwrap_or_else(|| hostname.to_string());
    let network = render::networkd(&seed, &interface);
    let tesserad = render::tesserad_seed(
        &seed,
        &hostname,
        &interface,
        address,
        render::DATA_DIR,
        "seed",
    )?;
    println!("# /etc/hostname\n{hostname}\n");
    println!("# /etc/systemd/network/10-tessera-management.network\n{network}");
    if let Some(m) = render::management(&seed, &interface) {
        println!("# tessera-network.service (tessera-firstboot network, through netlink)");
        for a in &m.addresses {
            println!("address {a} on {interface}");
        }
        for r in &m.routes {
            println!("route {r} on {interface}");
        }
        println!();
    }
    println!("# /etc/tessera/seed.toml\n{tesserad}");
    Ok(())
}

fn ask_status(data_dir: &Path) -> anyhow::Result<serde_json::Value> {
    let path = data_dir.join("tesserad.sock");
    let mut s = UnixStream::connect(&path).with_context(|| format!("{}", path.display()))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    s.write_all(b"{\"op\":\"status\"}\n")?;
    let mut line = String::new();
    BufReader::new(s).read_line(&mut line)?;
    let v: serde_json::Value = serde_json::from_str(&line).context("status reply")?;
    v.get("ok")
        .cloned()
        .with_context(|| format!("status socket said {v}"))
}

/// The release of the root whose `/etc` is `etc` (`<etc>/tessera-release`), "unknown"
/// when it has none.
fn this_release(etc: &Path) -> String {
    etc_line(etc, "tessera-release", "unknown")
}

/// The data partition's format record, if any (an unreadable file is `Some` of what
/// could be read, so that it is refused rather than overwritten).
fn read_format_record(data_dir: &Path) -> anyhow::Result<Option<String>> {
    let path = data_dir.join(data_format::FILE);
    match std::fs::read(&path) {
        Ok(bytes) => Ok(Some(String::from_utf8_lossy(&bytes).into_owned())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
    }
}

/// Why this release must not start on the data partition, if it must not.
fn data_format_refusal(etc: &Path, data_dir: &Path) -> Option<String> {
    let text = read_format_record(data_dir).ok()??;
    let file = data_dir.join(data_format::FILE).display().to_string();
    data_format::decide(
        Some(&text),
        true,
        data_format::KNOWN,
        &this_release(etc),
        &file,
    )
    .err()
    .map(|e| e.to_string())
}

/// The console's screen of a node whose daemons must not start (getty's `\` escapes kept
/// out of the reason).
fn not_starting(why: &str) -> String {
    format!("\nTessera node: not starting\n\n  {why}\n\n").replace('\\', "\\\\")
}

fn check_data_format(etc: &Path, data_dir: &Path) -> anyhow::Result<()> {
    let path = data_dir.join(data_format::FILE);
    let existing = read_format_record(data_dir)?;
    // Anything besides the record (and mkfs's lost+found) is data a release wrote.
    let has_data = std::fs::read_dir(data_dir)
        .with_context(|| format!("listing {}", data_dir.display()))?
        .filter_map(|e| e.ok())
        .any(|e| {
            let name = e.file_name();
            name != "lost+found" && name != data_format::FILE
        });
    let release = this_release(etc);
    let decision = data_format::decide(
        existing.as_deref(),
        has_data,
        data_format::KNOWN,
        &release,
        &path.display().to_string(),
    );
    match decision {
        Ok(Decision::Keep) => {
            println!(
                "data partition: format {} ({release} reads it)",
                data_format::KNOWN
            );
            Ok(())
        }
        Ok(Decision::Write(rec)) => {
            write_file(&path, &data_format::render(&rec), 0o600)?;
            println!(
                "data partition: format {} recorded by {release}",
                rec.format
            );
            Ok(())
        }
        Err(e) => {
            // Nothing is written: the record stays for the release that can read the data.
            let _ = write_file(&etc.join("issue"), &not_starting(&e.to_string()), 0o644);
            Err(e.into())
        }
    }
}

fn write_issue(etc: &Path, data_dir: &Path, out: &Path) -> anyhow::Result<()> {
    // Until the seed is applied the screen is first boot's: its reason for refusing the
    // seed must stay where someone at the console reads it.
    if !node_seed_path(etc).exists() {
        return Ok(());
    }
    // A data partition this release must not use: its reason stays on the screen.
    if let Some(why) = data_format_refusal(etc, data_dir) {
        return write_file(out, &not_starting(&why), 0o644);
    }
    let seed = load(&node_seed_path(etc)).ok().map(|(_, s)| s);
    let interface = seed.as_ref().and_then(|s| interface_of(s).ok());
    // A static seed's address is the node's management address, whatever else the
    // interface carries.
    let address = match (&interface, seed.as_ref().and_then(|s| s.static_address())) {
        (Some(i), Some(c)) => Some((i.as_str(), c.ip)),
        (Some(i), None) => address_of(i)?.map(|ip| (i.as_str(), ip)),
        (None, _) => None,
    };
    let status = ask_status(data_dir);
    let why = status.as_ref().err().map(|e| format!("{e:#}"));
    let hostname = hostname_of(etc);
    let text = issue::render(&Screen {
        hostname: &hostname,
        address,
        status: match &status {
            Ok(doc) => Ok(doc),
            Err(_) => Err(why.as_deref().unwrap_or_default()),
        },
        expected_nodes: seed.as_ref().map(|s| s.expected_nodes),
        memory: services_memory(),
    });
    write_file(out, &text, 0o644)
}

/// The Tessera services' processes whose memory the screen shows.
const SERVICES: [&str; 3] = ["tesserad", "tessera-store", "tessera-vmm"];

/// Resident memory (VmRSS, KiB) of the Tessera services, summed per program name.
fn services_memory() -> Vec<(String, u64)> {
    let mut out: Vec<(String, u64)> = Vec::new();
    let Ok(procs) = std::fs::read_dir("/proc") else {
        return out;
    };
    for p in procs.filter_map(|e| e.ok()) {
        let dir = p.path();
        let Ok(comm) = std::fs::read_to_string(dir.join("comm")) else {
            continue;
        };
        let comm = comm.trim();
        if !SERVICES.contains(&comm) {
            continue;
        }
        let rss = std::fs::read_to_string(dir.join("status"))
            .ok()
            .and_then(|s| {
                s.lines()
                    .find_map(|l| l.strip_prefix("VmRSS:"))
                    .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
            })
            .unwrap_or(0);
        match out.iter_mut().find(|(n, _)| n == comm) {
            Some((_, k)) => *k += rss,
            None => out.push((comm.to_string(), rss)),
        }
    }
    out.sort();
    out
}
