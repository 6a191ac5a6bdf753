//! What the engine's checksums and copy-on-write layers cost, without the network:
//! 4 KiB random reads and writes through the store against plain pread/pwrite on a file in
//! the same directory, and reads through deeper snapshot chains. Run: `bench/engine.sh`.

use std::fs::OpenOptions;
use std::os::unix::fs::FileExt;
use std::time::{Duration, Instant};

use rand::{Rng, SeedableRng};
use tessera_blockstore::{Store, StoreOptions, BLOCK_SIZE};

const SIZE: u64 = 256 << 20;
const BLOCKS: u64 = SIZE / BLOCK_SIZE as u64;
const RUN: Duration = Duration::from_secs(2);

fn rate(mut op: impl FnMut(u64)) -> f64 {
    let mut rng = rand::rngs::StdRng::seed_from_u64(1);
    let start = Instant::now();
    let mut n = 0u64;
    while start.elapsed() < RUN {
        for _ in 0..256 {
            op(rng.gen_range(0..BLOCKS) * BLOCK_SIZE as u64);
        }
        n += 256;
    }
    n as f64 / start.elapsed().as_secs_f64()
}

/// MiB/s of `op` on consecutive 1 MiB offsets, wrapping around the volume.
fn seq_rate(mut op: impl FnMut(u64)) -> f64 {
    let start = Instant::now();
    let mut n = 0u64;
    while start.elapsed() < RUN {
        op((n % (SIZE >> 20)) << 20);
        n += 1;
    }
    n as f64 / start.elapsed().as_secs_f64()
}

fn main() {
    let dir = std::env::args()
        .nth(1)
        .filter(|a| !a.starts_with('-'))
        .map(std::path::PathBuf::from)
        .unwrap_or_else(std::env::temp_dir);
    let work = tempfile::tempdir_in(&dir).expect("work dir");
    let block = vec![0x5au8; BLOCK_SIZE];
    let mut buf = vec![0u8; BLOCK_SIZE];

    // Reference: a plain file, written through once so reads hit data.
    let path = work.path().join("plain.img");
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(&path)
        .expect("file");
    for b in 0..BLOCKS {
        f.write_all_at(&block, b * BLOCK_SIZE as u64).expect("fill");
    }
    let file_write = rate(|off| f.write_all_at(&block, off).expect("pwrite"));
    let file_read = rate(|off| f.read_exact_at(&mut buf, off).expect("pread"));
    let mib = vec![0x3cu8; 1 << 20];
    let mut mib_buf = vec![0u8; 1 << 20];
    let file_seq_write = seq_rate(|off| f.write_all_at(&mib, off).expect("pwrite"));
    let file_seq_read = seq_rate(|off| f.read_exact_at(&mut mib_buf, off).expect("pread"));

    let store = Store::open(&work.path().join("store"), StoreOptions::default()).expect("store");
    store.create_volume("v", SIZE).expect("volume");
    let e = store.open_export("v").expect("export");
    let big = vec![0x5au8; 1 << 20];
    for off in (0..SIZE).step_by(1 << 20) {
        e.write_at(off, &big, false).expect("fill");
    }
    store.checkpoint().expect("checkpoint");
    let store_write = rate(|off| e.write_at(off, &block, false).expect("write"));
    store.checkpoint().expect("checkpoint");
    let store_read = rate(|off| e.read_at(off, &mut buf).expect("read"));
    // Overwrites of data in place: each waits for its record to be durable.
    let store_seq_write = seq_rate(|off| e.write_at(off, &mib, false).expect("write"));
    store.checkpoint().expect("checkpoint");
    let store_seq_read = seq_rate(|off| e.read_at(off, &mut mib_buf).expect("read"));

    let t = Instant::now();
    let mut n = 0u32;
    while t.elapsed() < RUN {
        std::hint::black_box(blake3::hash(&block));
        n += 1;
    }
    let hash_ns = t.elapsed().as_nanos() as f64 / f64::from(n);
    // What the store's reads and writes pay per MiB at least: the checksums of its 256
    // blocks, side by side (on this thread when the machine has fewer than four cores, as
    // the store does there; see src/hash.rs).
    let t = Instant::now();
    let mut n = 0u32;
    while t.elapsed() < RUN {
        std::hint::black_box(tessera_blockstore::hash_blocks(&mib));
        n += 1;
    }
    let hash_mib_us = t.elapsed().as_secs_f64() * 1e6 / f64::from(n);

    println!("| what | ops/s | vs plain file |");
    println!("|---|---:|---:|");
    println!("| plain file pwrite 4K random | {file_write:.0} | 1.00× |");
    println!(
        "| store write 4K random (WAL + checksum) | {store_write:.0} | {:.2}× |",
        store_write / file_write
    );
    println!("| plain file pread 4K random | {file_read:.0} | 1.00× |");
    println!(
        "| store read 4K random (checksum verified) | {store_read:.0} | {:.2}× |",
        store_read / file_read
    );
    println!("| plain file pwrite 1M sequential (MiB/s) | {file_seq_write:.0} | 1.00× |");
    println!(
        "| store overwrite 1M sequential, in place (MiB/s) | {store_seq_write:.0} | {:.2}× |",
        store_seq_write / file_seq_write
    );
    println!("| plain file pread 1M sequential (MiB/s) | {file_seq_read:.0} | 1.00× |");
    println!(
        "| store read 1M sequential (MiB/s) | {store_seq_read:.0} | {:.2}× |",
        store_seq_read / file_seq_read
    );
    // Deeper chains: each snapshot adds a layer that a read of old data looks through.
    let mut depth = 0;
    for target in [4, 16] {
        while depth < target {
            store
                .create_snapshot("v", &format!("s{depth}"))
                .expect("snapshot");
            depth += 1;
        }
        let r = rate(|off| e.read_at(off, &mut buf).expect("read"));
        println!(
            "| store read 4K random through {target} snapshot layers | {r:.0} | {:.2}× |",
            r / file_read
        );
    }
    println!();
    println!("blake3 of one 4 KiB block: {hash_ns:.0} ns");
    println!(
        "checksums of 1 MiB (256 blocks side by side, one thread): {hash_mib_us:.0} µs ({:.0} MiB/s)",
        1e6 / hash_mib_us
    );
}
