//! Durability beyond kill -9 (issue #9): the store runs on powerfs, a FUSE filesystem
//! that can lose power, and must keep every write a completed FLUSH (or FUA) covered
//! through hundreds of power cuts, whatever the cut leaves of unsynced data. See
//! `docs/power-loss.md` for the model, the modes, and how to reproduce a seed.

// Test code: the unexpected should panic where it happens (see tests/src/lib.rs).
#![allow(clippy::unwrap_used)]
#![forbid(unsafe_code)]

use std::fs::{self, File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::Path;

use tessera_tests::power_loss::history::Problem;
use tessera_tests::power_loss::{CycleStats, Finding, Harness, Mix, Options};
use tessera_tests::powerfs::{self, CutMode, PowerFs};

fn sync_dir(p: &Path) {
    File::open(p).unwrap().sync_all().unwrap();
}

fn read(p: &Path) -> Option<Vec<u8>> {
    fs::read(p).ok()
}

/// The filesystem itself, through real system calls: what a cut keeps and drops.
#[test]
fn powerfs_keeps_exactly_what_was_synced() {
    if !powerfs::available_or_skip("powerfs_keeps_exactly_what_was_synced") {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let mnt = tmp.path().join("mnt");
    fs::create_dir(&mnt).unwrap();
    let mut pfs = PowerFs::mount(&mnt).unwrap();

    // A durable file, then unsynced changes of every kind the store makes.
    let dir = mnt.join("d");
    fs::create_dir(&dir).unwrap();
    sync_dir(&mnt);
    let a = dir.join("a");
    let mut f = File::create(&a).unwrap();
    f.write_all(&[1u8; 8192]).unwrap();
    f.sync_all().unwrap();
    sync_dir(&dir);
    f.write_all_at(&[2u8; 100], 10).unwrap();
    f.set_len(12288).unwrap();
    drop(f);
    let b = dir.join("b");
    let mut g = File::create(&b).unwrap();
    g.write_all(b"synced file, unsynced name").unwrap();
    g.sync_data().unwrap();
    drop(g);
    fs::write(dir.join("tmp"), b"renamed").unwrap();
    fs::rename(dir.join("tmp"), &a).unwrap();
    // Reads see the changes now.
    assert_eq!(read(&a).unwrap(), b"renamed");
    assert!(b.exists());

    let report = pfs.power_cut(CutMode::DropAll, 1).unwrap();
    assert_eq!(read(&a).unwrap(), vec![1u8; 8192], "{report:?}");
    assert!(
        !b.exists(),
        "a file whose directory was never synced survived"
    );
    assert!(!dir.join("tmp").exists());

    // Hole punching keeps the size and zeroes; synced, it survives.
    let f = OpenOptions::new().read(true).write(true).open(&a).unwrap();
    nix::fcntl::fallocate(
        f.as_raw_fd(),
        nix::fcntl::FallocateFlags::FALLOC_FL_PUNCH_HOLE
            | nix::fcntl::FallocateFlags::FALLOC_FL_KEEP_SIZE,
        4096,
        4096,
    )
    .unwrap();
    f.sync_data().unwrap();
    drop(f);
    pfs.power_cut(CutMode::DropAll, 2).unwrap();
    let got = read(&a).unwrap();
    assert_eq!(got.len(), 8192);
    assert!(got[..4096].iter().all(|b| *b == 1) && got[4096..].iter().all(|b| *b == 0));

    // Lying sync: success, nothing durable.
    pfs.set_lying_sync(true);
    let mut f = OpenOptions::new().write(true).open(&a).unwrap();
    f.seek(SeekFrom::Start(0)).unwrap();
    f.write_all(&[9u8; 4096]).unwrap();
    f.sync_all().unwrap();
    drop(f);
    pfs.power_cut(CutMode::DropAll, 3).unwrap();
    pfs.set_lying_sync(false);
    let mut buf = [0u8; 4096];
    File::open(&a).unwrap().read_exact(&mut buf).unwrap();
    assert_eq!(buf, [1u8; 4096], "a lying sync made data durable");
    let counts = pfs.sync_counts();
    assert!(
        counts.lied >= 1 && counts.files >= 3 && counts.dirs >= 2,
        "{counts:?}"
    );

    // flock is local to the kernel: a second exclusive lock on the same file conflicts.
    let l1 = File::create(mnt.join("lock")).unwrap();
    let l1 = nix::fcntl::Flock::lock(l1, nix::fcntl::FlockArg::LockExclusiveNonblock).unwrap();
    let l2 = File::open(mnt.join("lock")).unwrap();
    assert!(
        nix::fcntl::Flock::lock(l2, nix::fcntl::FlockArg::LockExclusiveNonblock).is_err(),
        "flock on powerfs does not exclude"
    );
    drop(l1);
    let stat = nix::sys::statvfs::statvfs(&mnt).unwrap();
    assert!(stat.blocks_available() as u64 * stat.fragment_size() as u64 >= 1 << 40);
    pfs.unmount().unwrap();
}

/// Kills (and reaps) a child when dropped, so a failed test leaves none behind.
struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A mount namespace made while powerfs is mounted (an `unshare`, `ip netns exec`, an
/// image build beside the tests) holds a copy of the mount that our unmount does not
/// reach (private propagation), so the FUSE connection lives on and its request loops
/// never read ENODEV: the harness hung there at high load. A cut still ends within a
/// bound, and the filesystem is mounted and used again after it.
#[test]
fn a_cut_ends_while_another_mount_namespace_holds_a_copy_of_the_mount() {
    let test = "a_cut_ends_while_another_mount_namespace_holds_a_copy_of_the_mount";
    if !powerfs::available_or_skip(test) {
        return;
    }
    tessera_tests::require("unshare");
    let tmp = tempfile::tempdir().unwrap();
    let mnt = tmp.path().join("mnt");
    fs::create_dir(&mnt).unwrap();
    let mut pfs = PowerFs::mount(&mnt).unwrap();
    fs::write(mnt.join("before"), b"unsynced").unwrap();

    // The copy: a process in a mount namespace of its own, made now. It lets go of the
    // copies of the other tests' powerfs mounts at once (their cuts are theirs), says
    // which powerfs mounts it still holds, then waits (longer than the bound below).
    let script = r#"powerfs() { grep ' fuse.powerfs ' /proc/self/mountinfo | awk '{ print $5 }'; }
for m in $(powerfs); do [ "$m" = "$1" ] || umount -l "$m"; done
echo $(powerfs)
exec sleep 300"#;
    let mut holder = KillOnDrop(
        std::process::Command::new("unshare")
            .args([
                "--mount",
                "--propagation",
                "private",
                "sh",
                "-c",
                script,
                "sh",
            ])
            .arg(mnt.canonicalize().unwrap())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let mut seen = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(holder.0.stdout.take().unwrap()),
        &mut seen,
    )
    .unwrap();
    let ours = mnt.canonicalize().unwrap().display().to_string();
    assert_eq!(
        seen.trim(),
        ours,
        "the other namespace should hold a copy of this powerfs only"
    );

    // On a thread of its own, so that a hang fails the test instead of stopping it.
    let began = std::time::Instant::now();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let cut = pfs.power_cut(CutMode::DropAll, 1);
        let _ = tx.send((cut, pfs));
    });
    let bound = std::time::Duration::from_secs(30);
    let (cut, pfs) = rx
        .recv_timeout(bound)
        .unwrap_or_else(|_| panic!("the cut did not end within {bound:?} (the unmount hung)"));
    let took = began.elapsed();
    say(&format!(
        "cut with a copy of the mount held elsewhere: {took:?}"
    ));
    cut.unwrap();
    assert!(
        holder.0.try_wait().unwrap().is_none(),
        "the holder died early"
    );

    // Mounted again: the unsynced file is gone, and the filesystem works.
    assert!(!mnt.join("before").exists());
    fs::write(mnt.join("after"), b"written after the cut").unwrap();
    assert_eq!(read(&mnt.join("after")).unwrap(), b"written after the cut");
    drop(holder);
    drop(pfs);
}

/// Volume size in 4 KiB blocks (4 MiB).
const BLOCKS: u64 = 1024;
/// NBD connections, one request in flight on each.
const WORKERS: usize = 4;
/// The seed CI runs; `POWER_LOSS_SEED` picks another.
const DEFAULT_SEED: u64 = 0x9_d15c_0009;
/// Cycles CI runs; `POWER_LOSS_CYCLES` picks another number.
const DEFAULT_CYCLES: u64 = 200;
/// Lying-sync cycles within which the loss must be detected.
const LYING_CYCLES: u64 = 10;

/// A line on the real standard error (the test harness captures `eprintln!`).
fn say(line: &str) {
    let _ = writeln!(std::io::stderr().lock(), "{line}");
}

/// `NAME` as a number (decimal or 0x-hex), if set.
fn env_number(name: &str) -> Option<u64> {
    let v = std::env::var(name).ok()?;
    let v = v.trim();
    let parsed = match v.strip_prefix("0x") {
        Some(hex) => u64::from_str_radix(hex, 16),
        None => v.parse(),
    };
    Some(parsed.unwrap_or_else(|_| panic!("{name}={v} is not a number")))
}

/// The cycle test CI runs: every request kind, mixed (`Mix::FULL`).
#[test]
fn flushed_writes_survive_power_cuts_at_random_points() {
    if !powerfs::available_or_skip("flushed_writes_survive_power_cuts_at_random_points") {
        return;
    }
    run_cycles(Mix::FULL, "every request pattern, mixed");
}

/// Runs `POWER_LOSS_CYCLES` cycles (200) from `POWER_LOSS_SEED`, alternating drop-all and
/// tear cuts, and prints what they did; `mix` (described by `what`) picks the requests.
fn run_cycles(mix: Mix, what: &str) {
    let seed = env_number("POWER_LOSS_SEED").unwrap_or(DEFAULT_SEED);
    let cycles = env_number("POWER_LOSS_CYCLES").unwrap_or(DEFAULT_CYCLES);
    say(&format!(
        "power_loss: seed {seed:#x}, {cycles} cycles (set POWER_LOSS_SEED / POWER_LOSS_CYCLES to change)"
    ));
    say(&format!("power_loss: workload: {what}"));
    let started = std::time::Instant::now();
    let opts = Options {
        blocks: BLOCKS,
        workers: WORKERS,
        mix,
        sync_latency: true,
    };
    let mut h = Harness::new(seed, opts);
    let mut total = CycleStats::default();
    let mut per_mode = [0u64; 2];
    for k in 0..cycles {
        // Alternate, so both modes get half of any run.
        let mode = if k % 2 == 0 {
            CutMode::DropAll
        } else {
            CutMode::Tear
        };
        per_mode[(k % 2) as usize] += 1;
        let s = h.cycle(k, mode, None).unwrap_or_else(|f| panic!("{f}"));
        total.answered += s.answered;
        total.flushes += s.flushes;
        total.durable_blocks += s.durable_blocks;
        total.pages_dropped += s.pages_dropped;
        total.pages_kept += s.pages_kept;
        total.unsynced_items += s.unsynced_items;
        for (t, p) in total.phases.iter_mut().zip(s.phases) {
            *t += p;
        }
    }
    let elapsed = started.elapsed();
    let syncs = h.powerfs().sync_counts();
    let per = |d: std::time::Duration| d / cycles.max(1) as u32;
    say(&format!(
        "power_loss: per cycle: workload {:.0?}, cut and restart {:.0?}, checks {:.0?}, \
         second cut and restart {:.0?}",
        per(total.phases[0]),
        per(total.phases[1]),
        per(total.phases[2]),
        per(total.phases[3]),
    ));
    say(&format!(
        "power_loss: {cycles} cycles ({} drop-all, {} tear) in {elapsed:.1?} ({:.0?} per cycle): \
         {} requests answered, {} flushes, {} blocks made durable; the cuts dropped {} page \
         updates and kept {} (tear), over {} unsynced files/directory changes; {} file and \
         {} directory syncs",
        per_mode[0],
        per_mode[1],
        elapsed / cycles.max(1) as u32,
        total.answered,
        total.flushes,
        total.durable_blocks,
        total.pages_dropped,
        total.pages_kept,
        total.unsynced_items,
        syncs.files,
        syncs.dirs,
    ));
    // The run must have exercised what it claims to: flushes that covered writes, and
    // cuts that lost something.
    assert!(total.flushes >= cycles, "too few flushes: {total:?}");
    assert!(
        total.durable_blocks >= cycles,
        "flushes covered too little: {total:?}"
    );
    assert!(
        total.pages_dropped > 0,
        "no cut dropped anything: {total:?}"
    );
    if cycles >= 2 {
        assert!(total.pages_kept > 0, "no tear kept anything: {total:?}");
    }
}

/// The harness bites: with syncs that do nothing, flushed writes are lost, and the checker
/// must say so within a few cycles.
#[test]
fn lying_sync_is_caught_as_lost_flushed_writes() {
    if !powerfs::available_or_skip("lying_sync_is_caught_as_lost_flushed_writes") {
        return;
    }
    let seed = env_number("POWER_LOSS_SEED").unwrap_or(DEFAULT_SEED) ^ 0x11e;
    let opts = Options {
        blocks: BLOCKS,
        workers: WORKERS,
        mix: Mix::FULL,
        sync_latency: false,
    };
    let mut h = Harness::new(seed, opts);
    h.powerfs().set_lying_sync(true);
    for k in 0..LYING_CYCLES {
        let failure = match h.cycle(k, CutMode::DropAll, Some(true)) {
            Ok(_) => continue,
            Err(f) => f,
        };
        let Finding::Data(violations) = &failure.finding else {
            panic!("lying sync was detected, but not as lost data:\n{failure}");
        };
        assert!(
            violations
                .iter()
                .any(|v| v.problem == Problem::LostFlushedWrite),
            "lying sync detected without a lost flushed write:\n{failure}"
        );
        say(&format!(
            "power_loss: lying sync caught in cycle {k}; the checker reported:\n{failure}"
        ));
        return;
    }
    panic!("{LYING_CYCLES} cycles of lying sync and the checker saw no lost flushed write");
}
