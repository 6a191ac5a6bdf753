//! The `tesserad` binary: parses its arguments, sets up logging, the allocator and the
//! async runtime, and runs the daemon (the `tesserad` library).

// One allocator tunable needs `unsafe`; everything else is in the safe library.
#![deny(unsafe_code)]

use std::path::PathBuf;

use clap::Parser;

mod systemd_notify;

#[derive(Parser)]
#[command(name = "tesserad", version, about = "Tessera's management daemon")]
struct Cli {
    /// The seed configuration.
    #[arg(long, default_value = "/etc/tessera/seed.toml")]
    seed: PathBuf,
}

fn main() -> std::process::ExitCode {
    // The node's files hold the cluster's secrets and state (the Raft log with the CA and
    // password hashes, keys, the first administrator's password): owner only, from the
    // first file on.
    nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o077));
    let filter = tracing_subscriber::EnvFilter::try_from_env("TESSERA_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    keep_large_allocations_in_mmap();
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(std::thread::available_parallelism().map_or(2, |n| n.get().min(4)))
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            tracing::error!(error = %e, "cannot start the async runtime");
            return std::process::ExitCode::FAILURE;
        }
    };
    systemd_notify::start(&cli.seed);
    match rt.block_on(tesserad::run(&cli.seed)) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// Password hashing allocates ~19 MiB per hash. glibc would serve such blocks from a heap
/// it never gives back once its dynamic mmap threshold has grown; a fixed threshold keeps
/// large blocks in mmap, returned to the system when freed, so an idle daemon stays small.
/// Must run before the runtime starts its threads.
#[allow(unsafe_code)]
fn keep_large_allocations_in_mmap() {
    // SAFETY: mallopt only changes allocator tunables; it is called before any other
    // thread exists, with a documented parameter and a positive value.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 256 * 1024);
    }
}
