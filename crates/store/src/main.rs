//! `tessera-store`: run the block-storage service, or administer a running one.

#![forbid(unsafe_code)]

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand, ValueEnum};
use tessera_blockstore::StoreOptions;
use tessera_nbd::ServerConfig;
use tessera_store::admin_client::AdminClient;
use tessera_store::daemon::{self, DaemonConfig};
use tessera_store_admin::{AdminOp, AdminReply, StoreStatus};
use tessera_units::{format_size, parse_size};

mod systemd_notify;

const DEFAULT_DATA_DIR: &str = "/var/lib/tessera/store";
/// `tesserad`'s credentials directory with its default `data_dir`.
const DEFAULT_TLS_DIR: &str = "/var/lib/tessera/tls";

#[derive(Parser)]
#[command(
    name = "tessera-store",
    version,
    about = "Tessera's block-storage service"
)]
struct Cli {
    /// Admin socket of the running service (default: <data-dir>/admin.sock).
    #[arg(long, global = true)]
    admin_socket: Option<PathBuf>,
    /// Output format of admin commands.
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
    /// Run the service in the foreground.
    Serve(ServeArgs),
    /// Run the service with a demo volume and print how to reach it.
    Demo {
        #[command(flatten)]
        serve: ServeArgs,
        /// Size of the demo volume.
        #[arg(long, default_value = "1G", value_parser = parse_size)]
        size: u64,
    },
    /// Manage volumes.
    #[command(subcommand)]
    Volume(VolumeCmd),
    /// Manage snapshots.
    #[command(subcommand)]
    Snapshot(SnapshotCmd),
    /// Make a new volume from a snapshot (copy-on-write).
    Clone {
        /// Source volume.
        volume: String,
        /// Source snapshot.
        snapshot: String,
        /// Name of the new volume.
        name: String,
    },
    /// Verify the checksum of every stored block and list the bad ones.
    Scrub,
    /// Say whether the store is degraded (a sync failed: flushes fail until a restart)
    /// and what it holds; exits non-zero when degraded.
    Status,
    /// Every replicated volume's role, generation and replicas' states (JSON).
    Replication,
}

#[derive(clap::Args, Clone)]
struct ServeArgs {
    /// Where volumes live.
    #[arg(long, default_value = DEFAULT_DATA_DIR)]
    data_dir: PathBuf,
    /// NBD over TCP with TLS required (a client certificate of the cluster CA); served
    /// once --nbd-tls-dir holds this node's credentials.
    #[arg(long)]
    nbd_tcp: Option<SocketAddr>,
    /// Where tesserad writes this node's credentials (ca.crt, node.crt, node.key), for
    /// NBD over TLS and replication.
    #[arg(long, visible_alias = "tls-dir", default_value = DEFAULT_TLS_DIR)]
    nbd_tls_dir: PathBuf,
    /// Replication over QUIC on this UDP address (mutual TLS with the node's
    /// credentials, ALPN tessera-repl/<version>): other stores' primaries reach this
    /// store's replicas here, and this store's primaries reach theirs from it. Off when
    /// not given.
    #[arg(long)]
    repl_quic: Option<SocketAddr>,
    /// The newest replication protocol version to offer peers (default: the newest this
    /// store speaks). Lower only to make this store speak as an older release does on the
    /// wire (docs/replication.md, "Protocol versions"); each connection settles on the
    /// newest version both ends offer in any case.
    #[arg(long, default_value_t = tessera_replication::wire::VERSION,
        value_parser = clap::value_parser!(u8).range(
            tessera_replication::wire::OLDEST_VERSION as i64..=tessera_replication::wire::VERSION as i64))]
    repl_max_version: u8,
    /// The QUIC volume export on this UDP address (docs/volume-export.md: `tessera volume
    /// cp` and tessera-volume-client), with the same credentials and the same rule as NBD
    /// over TLS (a client certificate of the cluster CA). Off when not given; the
    /// cluster's convention is the NBD port's number, 10809, over UDP.
    #[arg(long)]
    export_quic: Option<SocketAddr>,
    /// The node's tesserad status socket (tesserad's <data-dir>/tesserad.sock): a client
    /// writing a volume this store holds a replica copy of makes this node its primary
    /// through the cluster, and one asking for a volume this store holds no copy of is
    /// told where its copies are. Without it a replica copy's writes are refused.
    #[arg(long)]
    tesserad_socket: Option<PathBuf>,
    /// Plain NBD over TCP, no authentication at all: only on an address where everyone
    /// who can reach it is trusted (loopback of a single-user machine, tests).
    #[arg(long)]
    nbd_tcp_plain: Option<SocketAddr>,
    /// Do not listen on TCP at all (the default unless --nbd-tcp or --nbd-tcp-plain is
    /// given; kept for older scripts).
    #[arg(long)]
    no_tcp: bool,
    /// NBD over a Unix socket (default: <data-dir>/nbd.sock).
    #[arg(long)]
    nbd_unix: Option<PathBuf>,
    /// Checkpoint the write-ahead log once a segment reaches this size.
    #[arg(long, default_value = "64M", value_parser = parse_size)]
    wal_segment_size: u64,
    /// Checkpoint a non-empty write-ahead log at least this often (milliseconds).
    #[arg(long, default_value_t = 10_000)]
    checkpoint_interval_ms: u64,
    /// Disconnect an NBD client that has not chosen an export this long after
    /// connecting (milliseconds).
    #[arg(long, default_value_t = 10_000)]
    nbd_negotiation_timeout_ms: u64,
    /// How long an NBD connection polls for its client's next request after replying
    /// before its thread sleeps (microseconds; 0: never). See docs/nbd.md, "Threads".
    #[arg(long, default_value_t = 50)]
    nbd_poll_us: u64,
    /// Start even if the write-ahead log holds a damaged record that a completed flush
    /// covered: drop it and everything logged after it (acknowledged writes are lost;
    /// the store refuses to start without this, naming the record).
    #[arg(long)]
    accept_wal_damage: bool,
}

#[derive(Subcommand)]
enum VolumeCmd {
    /// Create a thin volume.
    Create {
        /// Name.
        name: String,
        /// Size (e.g. 10G).
        #[arg(long, value_parser = parse_size)]
        size: u64,
    },
    /// List volumes.
    Ls,
    /// Show one volume.
    Info {
        /// Name.
        name: String,
    },
    /// Grow a volume.
    Resize {
        /// Name.
        name: String,
        /// New size (e.g. 20G).
        #[arg(long, value_parser = parse_size)]
        size: u64,
    },
    /// Delete a volume and its snapshots.
    Rm {
        /// Name.
        name: String,
    },
}

#[derive(Subcommand)]
enum SnapshotCmd {
    /// Take a snapshot.
    Create {
        /// Volume.
        volume: String,
        /// Snapshot name.
        snapshot: String,
    },
    /// Delete a snapshot.
    Rm {
        /// Volume.
        volume: String,
        /// Snapshot name.
        snapshot: String,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// The store's files (WAL, layers, catalog) hold the disks' contents: whatever the
/// daemon creates is for its owner only.
fn private_umask() {
    nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o077));
}

fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("TESSERA_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
}

fn daemon_config(args: &ServeArgs, admin: Option<PathBuf>) -> DaemonConfig {
    DaemonConfig {
        nbd_tcp: args.nbd_tcp.filter(|_| !args.no_tcp),
        nbd_tls_dir: Some(args.nbd_tls_dir.clone()),
        repl_quic: args.repl_quic,
        repl_max_version: args.repl_max_version,
        export_quic: args.export_quic,
        tesserad_socket: args.tesserad_socket.clone(),
        nbd_tcp_plain: args.nbd_tcp_plain.filter(|_| !args.no_tcp),
        nbd_unix: args
            .nbd_unix
            .clone()
            .unwrap_or_else(|| args.data_dir.join("nbd.sock")),
        admin_socket: admin.unwrap_or_else(|| args.data_dir.join("admin.sock")),
        data_dir: args.data_dir.clone(),
        store: StoreOptions {
            wal_segment_bytes: args.wal_segment_size,
            checkpoint_interval: Duration::from_millis(args.checkpoint_interval_ms.max(1)),
            accept_wal_damage: args.accept_wal_damage,
        },
        nbd: ServerConfig {
            negotiation_timeout: Duration::from_millis(args.nbd_negotiation_timeout_ms.max(1)),
            poll_for_next: Duration::from_micros(args.nbd_poll_us),
            ..ServerConfig::default()
        },
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    let admin_path = cli
        .admin_socket
        .clone()
        .unwrap_or_else(|| PathBuf::from(DEFAULT_DATA_DIR).join("admin.sock"));
    let op = match cli.cmd {
        Cmd::Serve(args) => {
            private_umask();
            init_logging();
            let cfg = daemon_config(&args, cli.admin_socket);
            return serve(cfg, None);
        }
        Cmd::Demo { serve: args, size } => {
            private_umask();
            init_logging();
            let cfg = daemon_config(&args, cli.admin_socket);
            return serve(cfg, Some(size));
        }
        Cmd::Volume(VolumeCmd::Create { name, size }) => AdminOp::CreateVolume { name, size },
        Cmd::Volume(VolumeCmd::Ls) => AdminOp::ListVolumes {},
        Cmd::Volume(VolumeCmd::Info { name }) => AdminOp::VolumeInfo { name },
        Cmd::Volume(VolumeCmd::Resize { name, size }) => AdminOp::ResizeVolume { name, size },
        Cmd::Volume(VolumeCmd::Rm { name }) => AdminOp::DeleteVolume { name },
        Cmd::Snapshot(SnapshotCmd::Create { volume, snapshot }) => {
            AdminOp::CreateSnapshot { volume, snapshot }
        }
        Cmd::Snapshot(SnapshotCmd::Rm { volume, snapshot }) => {
            AdminOp::DeleteSnapshot { volume, snapshot }
        }
        Cmd::Clone {
            volume,
            snapshot,
            name,
        } => AdminOp::CloneSnapshot {
            volume,
            snapshot,
            name,
        },
        Cmd::Scrub => AdminOp::Scrub {},
        Cmd::Status => AdminOp::Status {},
        Cmd::Replication => AdminOp::ReplicationStatus {},
    };
    let mut client = AdminClient::connect(&admin_path)?;
    let reply = client.call(op)?;
    print_reply(&reply, cli.output)?;
    match &reply {
        AdminReply::Scrub(r) if !r.bad.is_empty() => {
            anyhow::bail!("scrub found {} corrupt block(s)", r.bad.len());
        }
        AdminReply::Status(StoreStatus {
            degraded: Some(why),
            ..
        }) => anyhow::bail!(
            "the store is degraded ({why}): every flush fails until tessera-store restarts"
        ),
        _ => Ok(()),
    }
}

fn serve(cfg: DaemonConfig, demo_size: Option<u64>) -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    rt.block_on(async move {
        let running = daemon::start(&cfg).await?;
        if let Some(size) = demo_size {
            let store = running.store.clone();
            let existing = store.volume_info("demo").ok();
            if existing.is_none() {
                tokio::task::spawn_blocking(move || store.create_volume("demo", size))
                    .await?
                    .context("creating the demo volume")?;
            }
            print_demo(&cfg, running.nbd_tcp_plain);
        }
        systemd_notify::start(&cfg.admin_socket);
        wait_for_signal().await?;
        tracing::info!("stopping");
        running.shutdown().await;
        Ok(())
    })
}

async fn wait_for_signal() -> anyhow::Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).context("installing SIGTERM handler")?;
    tokio::select! {
        r = tokio::signal::ctrl_c() => r.context("waiting for Ctrl-C")?,
        _ = term.recv() => {}
    }
    Ok(())
}

fn print_demo(cfg: &DaemonConfig, tcp: Option<SocketAddr>) {
    let admin = cfg.admin_socket.display();
    println!();
    println!(
        "Tessera block store is running (data in {}).",
        cfg.data_dir.display()
    );
    if let Some(addr) = tcp {
        println!("  NBD (TCP):  nbd://{addr}/demo");
    }
    println!(
        "  NBD (Unix): nbd+unix:///demo?socket={}",
        cfg.nbd_unix.display()
    );
    println!("  Admin:      tessera-store --admin-socket {admin} volume ls");
    println!();
    println!("Try, in another terminal:");
    if let Some(addr) = tcp {
        println!("  qemu-img info nbd://{addr}/demo");
        println!("  nbdinfo --map nbd://{addr}/demo");
    }
    println!("  cargo run --release -p tessera-store -- --admin-socket {admin} snapshot create demo first");
    println!();
    println!("Ctrl-C stops it; running it again keeps the same volumes.");
}

fn print_reply(reply: &AdminReply, output: Output) -> anyhow::Result<()> {
    if let Output::Json = output {
        let v = match reply {
            AdminReply::Volume(v) => serde_json::to_string_pretty(v),
            AdminReply::Volumes(v) => serde_json::to_string_pretty(v),
            AdminReply::Snapshot(s) => serde_json::to_string_pretty(s),
            AdminReply::Scrub(r) => serde_json::to_string_pretty(r),
            AdminReply::Status(s) => serde_json::to_string_pretty(s),
            AdminReply::Replication(r) => serde_json::to_string_pretty(r),
            AdminReply::Done => Ok("{}".to_string()),
        }?;
        println!("{v}");
        return Ok(());
    }
    match reply {
        AdminReply::Volumes(vs) => {
            println!(
                "{:<24} {:>12} {:>12} {:>9}  ORIGIN",
                "NAME", "SIZE", "USED", "SNAPSHOTS"
            );
            for v in vs {
                println!(
                    "{:<24} {:>12} {:>12} {:>9}  {}",
                    v.name,
                    format_size(v.size),
                    format_size(v.allocated),
                    v.snapshots.len(),
                    v.origin.as_deref().unwrap_or("-")
                );
            }
        }
        AdminReply::Volume(v) => {
            println!("name:       {}", v.name);
            println!("size:       {} ({} bytes)", format_size(v.size), v.size);
            println!("used:       {}", format_size(v.allocated));
            println!("generation: {}", v.generation);
            println!("origin:     {}", v.origin.as_deref().unwrap_or("-"));
            for s in &v.snapshots {
                println!("snapshot:   {} ({})", s.name, s.export);
            }
        }
        AdminReply::Snapshot(s) => println!("snapshot {} created; export {}", s.name, s.export),
        AdminReply::Scrub(r) => {
            println!(
                "layers: {}  blocks checked: {}  bad: {}",
                r.layers,
                r.blocks_checked,
                r.bad.len()
            );
            for b in &r.bad {
                println!(
                    "BAD layer {} offset {} affects {}",
                    b.layer,
                    b.offset,
                    b.affects.join(", ")
                );
            }
        }
        AdminReply::Status(s) => {
            match &s.degraded {
                None => println!("state:      ok"),
                Some(why) => println!("state:      DEGRADED: {why}"),
            }
            println!("data dir:   {}", s.data_dir);
            println!("version:    {}", s.version);
            println!("volumes:    {}", s.volumes);
            println!("snapshots:  {}", s.snapshots);
        }
        // Nested per-replica states read better as JSON than as a table.
        AdminReply::Replication(r) => println!("{}", serde_json::to_string_pretty(r)?),
        AdminReply::Done => println!("done"),
    }
    Ok(())
}
