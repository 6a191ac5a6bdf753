//! `tessera-devcluster`: starts a local Tessera cluster on loopback — for every node a
//! `tesserad` and a `tessera-store`, on 127.0.0.N — waits until the nodes have formed their
//! cluster by themselves, prints where everything is, and stops it all on Ctrl-C. Running
//! it again reuses the same cluster (data stays in `--dir`).
//!
//! It is a launcher for development and demos; it never configures anything the nodes
//! would not find on their own (each gets a seed file, like a flashed node).

#![forbid(unsafe_code)]

mod ports;

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::Parser;
use rand::Rng;

#[derive(Parser)]
#[command(
    name = "tessera-devcluster",
    version,
    about = "A local Tessera cluster on loopback"
)]
struct Cli {
    /// Where the nodes keep their data.
    #[arg(long, default_value = "/var/tmp/tessera-dev")]
    dir: PathBuf,
    /// How many nodes.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u8).range(1..=9))]
    nodes: u8,
}

struct Proc {
    name: String,
    child: Child,
    log: PathBuf,
}

fn addr(i: u8) -> String {
    format!("127.0.0.{i}")
}

fn sibling(name: &str) -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe()?;
    let p = exe
        .parent()
        .context("no directory for the executable")?
        .join(name);
    if !p.exists() {
        bail!("{} not found next to tessera-devcluster: build the workspace (cargo build --release --bins)", p.display());
    }
    Ok(p)
}

/// Takes group and other access away from `path` (made by an older version, or by hand
/// with a wider umask), saying so: everything the cluster keeps is for root only.
fn make_private(path: &Path) -> anyhow::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let mode = match std::fs::symlink_metadata(path) {
        Ok(m) if !m.file_type().is_symlink() => m.permissions().mode(),
        Ok(_) => return Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
    };
    if mode & 0o077 != 0 {
        let private = mode & 0o7700;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(private))
            .with_context(|| format!("making {} private", path.display()))?;
        eprintln!(
            "note: {} was readable by others (mode {:o}); now {:o}",
            path.display(),
            mode & 0o7777,
            private & 0o7777
        );
    }
    Ok(())
}

/// Writes `text` to `path` whole: a new file (private through the umask) renamed over the
/// old one, so an old file's wider mode does not survive.
fn write_new(path: &Path, text: &str) -> anyhow::Result<()> {
    let tmp = path.with_extension("tmp");
    let _ = std::fs::remove_file(&tmp);
    std::fs::write(&tmp, text).with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("renaming to {}", path.display()))
}

fn join_secret(dir: &Path) -> anyhow::Result<String> {
    let p = dir.join("join-secret");
    make_private(&p)?;
    if let Ok(s) = std::fs::read_to_string(&p) {
        return Ok(s.trim().to_string());
    }
    let s: String = (0..32)
        .map(|_| rand::thread_rng().sample(rand::distributions::Alphanumeric) as char)
        .collect();
    write_new(&p, &s)?;
    Ok(s)
}

fn write_seed(node_dir: &Path, i: u8, n: u8, secret: &str) -> anyhow::Result<PathBuf> {
    let seed = node_dir.join("seed.toml");
    let peers: Vec<String> = (1..=n)
        .filter(|j| *j != i)
        .map(|j| format!("\"{}:7946\"", addr(j)))
        .collect();
    write_new(
        &seed,
        &format!(
            "cluster_name = \"dev\"\nnode_name = \"node{i}\"\njoin_secret = \"{secret}\"\nexpected_nodes = {n}\ndata_dir = \"{}\"\n\
             static_peers = [{}]\n\n[management]\naddress = \"{}:7946\"\nuse_multicast = false\n\n\
             [storage]\nadmin_socket = \"{}\"\nnbd = \"{}:10809\"\n",
            node_dir.join("data").display(),
            peers.join(", "),
            addr(i),
            node_dir.join("store/admin.sock").display(),
            addr(i)
        ),
    )?;
    Ok(seed)
}

fn spawn(name: String, cmd: &mut Command, log: PathBuf) -> anyhow::Result<Proc> {
    let f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log)?;
    // An old log kept its mode; what the daemons log is the cluster's business only.
    make_private(&log)?;
    let child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(f)
        .spawn()
        .with_context(|| format!("starting {name}"))?;
    Ok(Proc { name, child, log })
}

fn status(sock: &Path) -> Option<serde_json::Value> {
    let s = UnixStream::connect(sock).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    let mut w = s.try_clone().ok()?;
    w.write_all(b"{\"op\":\"status\"}\n").ok()?;
    let mut line = String::new();
    BufReader::new(s).read_line(&mut line).ok()?;
    serde_json::from_str::<serde_json::Value>(&line)
        .ok()
        .map(|v| v["ok"].clone())
}

fn tail(p: &Path) -> String {
    let t = std::fs::read_to_string(p).unwrap_or_default();
    let lines: Vec<&str> = t.lines().collect();
    lines[lines.len().saturating_sub(15)..].join("\n")
}

fn stop(procs: &mut [Proc]) {
    for p in procs.iter() {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(p.child.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        );
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    for p in procs.iter_mut() {
        while matches!(p.child.try_wait(), Ok(None)) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = p.child.kill();
        let _ = p.child.wait();
    }
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
    // The join secret, the seeds, the logs and (through the daemons, which set their own)
    // the nodes' state are root's only, from the first file on.
    nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o077));
    // Catch Ctrl-C and SIGTERM from the very start, so an early one still stops the
    // children we are about to start instead of orphaning them.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let (mut int, mut term) = {
        let _g = rt.enter();
        use tokio::signal::unix::{signal, SignalKind};
        (
            signal(SignalKind::interrupt())?,
            signal(SignalKind::terminate())?,
        )
    };
    let n = cli.nodes;
    std::fs::create_dir_all(&cli.dir).with_context(|| format!("creating {}", cli.dir.display()))?;
    make_private(&cli.dir)?;
    let secret = join_secret(&cli.dir)?;
    // A cluster formed by a Tessera from before mutual TLS has no node certificates and
    // no CA anyone could issue them from: it cannot come back. Say so instead of waiting.
    // (A new cluster stopped mid-formation has at least its founder's certificate.)
    let data = |i: u8| cli.dir.join(format!("node{i}/data"));
    let formed = (1..=n).any(|i| data(i).join("formed.json").exists());
    let certified = (1..=n).any(|i| data(i).join("tls/node.crt").exists());
    if formed && !certified {
        bail!(
            "{} holds a cluster made by an older Tessera (no TLS certificates); \
             remove that directory (or pick another with --dir) and run again",
            cli.dir.display()
        );
    }
    let taken = ports::taken(1..=n);
    if !taken.is_empty() {
        bail!(
            "the addresses this cluster's nodes listen on are in use:\n  {}\n\
             another local cluster is running (stop it: Ctrl-C where it runs), or the \
             process named holds them; nothing was started",
            taken.join("\n  ")
        );
    }
    let (tesserad, store) = (sibling("tesserad")?, sibling("tessera-store")?);
    let mut procs = Vec::new();
    for i in 1..=n {
        let node_dir = cli.dir.join(format!("node{i}"));
        std::fs::create_dir_all(node_dir.join("data"))?;
        make_private(&node_dir)?;
        let seed = write_seed(&node_dir, i, n, &secret)?;
        procs.push(spawn(
            format!("tessera-store on {}", addr(i)),
            Command::new(&store)
                .arg("serve")
                .arg("--data-dir")
                .arg(node_dir.join("store"))
                .args(["--nbd-tcp", &format!("{}:10809", addr(i))])
                // Replication between the stores (QUIC, UDP): tesserad finds it at the
                // NBD address's host, port 7410.
                .args(["--repl-quic", &format!("{}:7410", addr(i))])
                // The QUIC volume export (`tessera volume cp`): the NBD port's number
                // over UDP, where the CLI looks for it.
                .args(["--export-quic", &format!("{}:10809", addr(i))])
                // NBD over TCP needs TLS: the store serves it once tesserad has written
                // the node's certificate here.
                .arg("--nbd-tls-dir")
                .arg(node_dir.join("data/tls"))
                // A client writing a volume whose copy here is a replica makes this node
                // its primary through tesserad (docs/volume-export.md).
                .arg("--tesserad-socket")
                .arg(node_dir.join("data/tesserad.sock")),
            node_dir.join("store.log"),
        )?);
        procs.push(spawn(
            format!("tesserad on {}", addr(i)),
            Command::new(&tesserad).arg("--seed").arg(&seed),
            node_dir.join("tesserad.log"),
        )?);
    }
    println!(
        "Starting {n} nodes on 127.0.0.1-{n} (data in {}) ...",
        cli.dir.display()
    );
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        for p in procs.iter_mut() {
            if let Ok(Some(st)) = p.child.try_wait() {
                let msg = format!("{} exited with {st}:\n{}", p.name, tail(&p.log));
                stop(&mut procs);
                bail!(msg);
            }
        }
        let st: Vec<Option<serde_json::Value>> = (1..=n)
            .map(|i| status(&cli.dir.join(format!("node{i}/data/tesserad.sock"))))
            .collect();
        let leaders: Vec<Option<u64>> = st
            .iter()
            .map(|s| s.as_ref().and_then(|s| s["leader"].as_u64()))
            .collect();
        // Up means: one leader agreed by all, every node a voter and registered.
        let formed = leaders[0].is_some()
            && leaders.iter().all(|l| *l == leaders[0])
            && st.iter().all(|s| {
                s.as_ref().is_some_and(|s| {
                    s["voters"].as_array().map(|v| v.len()) == Some(n as usize)
                        && s["nodes"].as_object().map(|o| o.len()) == Some(n as usize)
                })
            });
        if formed {
            break;
        }
        if Instant::now() > deadline {
            stop(&mut procs);
            bail!(
                "the nodes did not form a cluster within 90 s; see the logs in {}",
                cli.dir.display()
            );
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    // The bootstrapping node creates the first administrator right after formation.
    let read_password = || {
        (1..=n)
            .find_map(|i| {
                std::fs::read_to_string(
                    cli.dir.join(format!("node{i}/data/initial-admin-password")),
                )
                .ok()
            })
            .map(|p| p.trim().to_string())
            .filter(|p| !p.is_empty())
    };
    let waited = Instant::now();
    let mut password = read_password();
    while password.is_none() && waited.elapsed() < Duration::from_secs(20) {
        std::thread::sleep(Duration::from_millis(100));
        password = read_password();
    }
    println!();
    println!("Tessera local cluster is up: {n} nodes formed one cluster by themselves.");
    for i in 1..=n {
        println!(
            "  node {i}: REST API https://{}:8006/api/v1   NBD nbds://{}:10809/<volume> (TLS; nbd+unix on {})",
            addr(i),
            addr(i),
            cli.dir.join(format!("node{i}/store/nbd.sock")).display()
        );
    }
    let ca = cli.dir.join("node1/data/tls/ca.crt");
    println!(
        "  Cluster CA (the API's HTTPS certificates are issued by it): {}",
        ca.display()
    );
    println!(
        "  Web console: https://{}:8006/ (any node; trust the cluster CA above in the browser)",
        addr(1)
    );
    match &password {
        Some(p) => println!("  Admin: user admin, initial password {p} (valid until changed; the first login must change it)"),
        None => println!("  Admin: no first-administrator password file found; use the password you set."),
    }
    println!();
    println!("Try:");
    println!(
        "  curl -s --cacert {} -X POST https://127.0.0.1:8006/api/v1/login -H 'content-type: application/json' -d '{{\"username\":\"admin\",\"password\":\"{}\"}}'",
        ca.display(),
        password.as_deref().unwrap_or("...")
    );
    println!(
        "  target/release/tessera --api https://127.0.0.1:8006 --ca-file {} login   # then: tessera password, tessera volume create demo --size 1G",
        ca.display()
    );
    println!(
        "  target/release/tessera volume export-creds --dir nbd-creds   # then: nbdinfo 'nbds://127.0.0.1:10809/demo?tls-certificates=nbd-creds'"
    );
    println!();
    println!("Ctrl-C stops everything; running this again reuses the same cluster.");
    let _ = std::io::stdout().flush();

    rt.block_on(async {
        tokio::select! {
            _ = int.recv() => {}
            _ = term.recv() => {}
        }
    });
    // The reader of our output may be gone by now: never die on a print before stopping.
    let _ = writeln!(std::io::stdout(), "Stopping ...");
    stop(&mut procs);
    let _ = writeln!(std::io::stdout(), "Stopped.");
    Ok(())
}
