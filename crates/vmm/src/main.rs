//! `tessera-vmm`: run one VM in the foreground.

#![forbid(unsafe_code)]

use std::io::Write;
use std::process::ExitCode;

use anyhow::Context;
use clap::Parser;
use tessera_vmm::config::VmConfig;
use tessera_vmm::net::NicConfig;
use tessera_vmm::vm::Launch;

#[derive(Parser)]
#[command(name = "tessera-vmm", version, about = "Run one KVM virtual machine")]
struct Cli {
    /// A JSON VM spec (fields: kernel, cmdline, memory_mib, vcpus, disk, nics); flags override it.
    #[arg(long)]
    spec: Option<std::path::PathBuf>,
    /// Kernel (ELF or bzImage).
    #[arg(long)]
    kernel: Option<String>,
    /// Initramfs.
    #[arg(long)]
    initrd: Option<String>,
    /// Kernel command line.
    #[arg(long)]
    cmdline: Option<String>,
    /// Guest RAM in MiB.
    #[arg(long)]
    memory_mib: Option<u64>,
    /// Number of vCPUs (more than one adds ACPI tables).
    #[arg(long)]
    vcpus: Option<u8>,
    /// Disk: a raw image path or an NBD URI (nbd+unix:///VOL?socket=PATH, nbd://HOST:PORT/VOL,
    /// with TLS nbds://HOST:PORT/VOL or nbds+unix:///VOL?socket=PATH; libnbd's
    /// ?tls-certificates=DIR and ?tls-hostname=NAME are understood). With --restore: the
    /// disk to attach, required when the snapshotted VM had one (a restore never opens the
    /// disk named in the snapshot).
    #[arg(long)]
    disk: Option<String>,
    /// TLS for an nbds:// disk: the CA certificate (PEM) the server's certificate must chain to.
    #[arg(long, requires_all = ["disk_tls_cert", "disk_tls_key"])]
    disk_tls_ca: Option<std::path::PathBuf>,
    /// TLS for an nbds:// disk: this client's certificate (PEM).
    #[arg(long, requires_all = ["disk_tls_ca", "disk_tls_key"])]
    disk_tls_cert: Option<std::path::PathBuf>,
    /// TLS for an nbds:// disk: this client's private key (PEM).
    #[arg(long, requires_all = ["disk_tls_ca", "disk_tls_cert"])]
    disk_tls_key: Option<std::path::PathBuf>,
    /// TLS for an nbds:// disk: the name the server's certificate must hold (default: the
    /// URI's host).
    #[arg(long)]
    disk_tls_hostname: Option<String>,
    /// How long an NBD disk request may take, reconnections to a restarting server
    /// included, before the guest gets an I/O error (milliseconds; default 30000).
    #[arg(long)]
    disk_timeout_ms: Option<u64>,
    /// Continue the VM snapshotted in this directory instead of booting (with --disk when
    /// the VM had a disk).
    #[arg(long, conflicts_with_all = ["spec", "kernel", "initrd", "cmdline", "memory_mib", "vcpus"])]
    restore: Option<std::path::PathBuf>,
    /// A NIC (repeat for more, at most 4): `tap=NAME,mac=MAC` opens the existing tap NAME
    /// (on its bridge already), `fd=N,mac=MAC` uses the inherited open tap fd N (opened
    /// with IFF_TAP | IFF_NO_PI | IFF_VNET_HDR). With --restore: the taps replacing the
    /// snapshot's, as many as it had (none given: the snapshot's taps by name).
    #[arg(long = "net", value_name = "tap=NAME,mac=MAC")]
    net: Vec<String>,
    /// Track written guest pages (see the `dirty_pages` API call).
    #[arg(long)]
    track_dirty_pages: bool,
    /// Receive a VM by live migration instead of booting: listen on this `ip:port` (port
    /// 0: any free port; `migration_status` says which, and the token the source must
    /// present) for the source VMM, over TLS with the --migration-tls-* credentials. The
    /// VM runs once the control API says `migration_go`; --memory-mib, --vcpus and --net
    /// must match the source's VM, --disk (opened only at `migration_go`) its disk.
    #[arg(long, requires_all = ["migration_tls_ca", "migration_tls_cert", "migration_tls_key", "api_socket"],
          conflicts_with_all = ["spec", "kernel", "initrd", "cmdline", "restore"])]
    incoming: Option<std::net::SocketAddr>,
    /// With --incoming: how long to wait for the source to connect (seconds).
    #[arg(long, default_value_t = 60, requires = "incoming")]
    incoming_wait_s: u64,
    /// With --incoming: the cluster CA certificate (PEM) the source's certificate must
    /// chain to.
    #[arg(long, requires = "incoming")]
    migration_tls_ca: Option<std::path::PathBuf>,
    /// With --incoming: this node's certificate (PEM).
    #[arg(long, requires = "incoming")]
    migration_tls_cert: Option<std::path::PathBuf>,
    /// With --incoming: this node's private key (PEM).
    #[arg(long, requires = "incoming")]
    migration_tls_key: Option<std::path::PathBuf>,
    /// Serve the control API (JSON lines) on this Unix socket.
    #[arg(long)]
    api_socket: Option<std::path::PathBuf>,
    /// Write the serial console here instead of standard output.
    #[arg(long)]
    serial_out: Option<std::path::PathBuf>,
}

fn main() -> ExitCode {
    // Snapshots hold guest memory, the serial log what the guest printed: owner only.
    nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o077));
    let filter = tracing_subscriber::EnvFilter::try_from_env("TESSERA_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
    match run(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            ExitCode::FAILURE
        }
    }
}

/// The environment variable holding the disk's writer key (`tessera_disk::WriterKey`).
const WRITER_KEY_ENV: &str = "TESSERA_DISK_WRITER_KEY";

fn run(cli: Cli) -> anyhow::Result<()> {
    let out: Box<dyn Write + Send> = match &cli.serial_out {
        Some(p) => {
            Box::new(std::fs::File::create(p).with_context(|| format!("creating {}", p.display()))?)
        }
        None => Box::new(std::io::stdout()),
    };
    let mut nbd = tessera_disk::NbdOptions {
        tls_ca: cli.disk_tls_ca.clone(),
        tls_cert: cli.disk_tls_cert.clone(),
        tls_key: cli.disk_tls_key.clone(),
        tls_hostname: cli.disk_tls_hostname.clone(),
        timeout_ms: cli.disk_timeout_ms,
        // From the environment, not the command line, which every local user can read
        // (`ps`); `tesserad` sets it for each VMM it starts (issue #8).
        writer_key: std::env::var(WRITER_KEY_ENV)
            .ok()
            .filter(|k| !k.is_empty())
            .map(tessera_disk::WriterKey),
    };
    let nics = cli
        .net
        .iter()
        .map(|s| NicConfig::parse(s))
        .collect::<Result<Vec<_>, _>>()?;
    if let (Some(listen), Some(ca), Some(cert), Some(key)) = (
        cli.incoming,
        &cli.migration_tls_ca,
        &cli.migration_tls_cert,
        &cli.migration_tls_key,
    ) {
        let cfg = VmConfig {
            kernel: String::new(),
            initrd: None,
            cmdline: String::new(),
            memory_mib: cli.memory_mib.unwrap_or(128),
            vcpus: cli.vcpus.unwrap_or(1),
            disk: cli.disk.clone(),
            track_dirty_pages: cli.track_dirty_pages,
            nbd,
            nics,
        };
        let args = tessera_vmm::migration::incoming::Args {
            cfg,
            listen,
            tls: tessera_vmm::migration::tls::TlsFiles {
                ca: ca.clone(),
                cert: cert.clone(),
                key: key.clone(),
            },
            wait: std::time::Duration::from_secs(cli.incoming_wait_s),
        };
        let outcome = tessera_vmm::vm::run(Launch::Incoming(args), out, cli.api_socket.as_deref())?;
        tracing::info!(reason = ?outcome.reason, "VM stopped");
        return Ok(());
    }
    if let Some(dir) = &cli.restore {
        let launch = Launch::Restore {
            dir: dir.clone(),
            disk: cli.disk.clone(),
            nbd,
            nics,
        };
        let outcome = tessera_vmm::vm::run(launch, out, cli.api_socket.as_deref())?;
        tracing::info!(reason = ?outcome.reason, "VM stopped");
        return Ok(());
    }
    let mut cfg = match &cli.spec {
        Some(p) => {
            let text =
                std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))?;
            serde_json::from_str::<VmConfig>(&text)
                .with_context(|| format!("parsing VM spec {}", p.display()))?
        }
        None => VmConfig {
            initrd: None,
            kernel: cli
                .kernel
                .clone()
                .context("--kernel or --spec is required")?,
            cmdline: "console=ttyS0 reboot=k panic=1".into(),
            memory_mib: 128,
            vcpus: 1,
            disk: None,
            track_dirty_pages: false,
            nbd: tessera_disk::NbdOptions::default(),
            nics: Vec::new(),
        },
    };
    if let Some(k) = cli.kernel {
        cfg.kernel = k;
    }
    if cli.initrd.is_some() {
        cfg.initrd = cli.initrd;
    }
    if let Some(c) = cli.cmdline {
        cfg.cmdline = c;
    }
    if let Some(m) = cli.memory_mib {
        cfg.memory_mib = m;
    }
    if cli.disk.is_some() {
        cfg.disk = cli.disk;
    }
    if !nics.is_empty() {
        cfg.nics = nics;
    }
    // The flags replace a spec's connection settings; the writer key joins them.
    let writer_key = nbd.writer_key.take();
    if nbd != tessera_disk::NbdOptions::default() {
        cfg.nbd = nbd;
    }
    if writer_key.is_some() {
        cfg.nbd.writer_key = writer_key;
    }
    cfg.track_dirty_pages |= cli.track_dirty_pages;
    if let Some(n) = cli.vcpus {
        cfg.vcpus = n;
    }
    let outcome = tessera_vmm::vm::run(Launch::Boot(cfg), out, cli.api_socket.as_deref())?;
    tracing::info!(reason = ?outcome.reason, first_instruction_us = outcome.first_instruction.map(|d| d.as_micros() as u64), "VM stopped");
    Ok(())
}
