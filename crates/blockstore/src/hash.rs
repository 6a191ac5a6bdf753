//! The checksums of many 4 KiB blocks at once: blake3 of each block, computed several
//! blocks side by side.
//!
//! A 4 KiB block is only four BLAKE3 chunks, so `blake3::hash` of one block fills four
//! SIMD lanes of the sixteen an AVX-512 core has (eight with AVX2), then hashes its two
//! parents and its root one at a time. Here the chunks of up to [`GROUP`] blocks go through
//! blake3's own multi-input kernel together: chunk *j* of every block in one call (all at
//! chunk counter *j*), then the first level of parents of every block, then every root.
//! The results are byte for byte `blake3::hash(block)`; measured ~1.6-1.8x faster per MiB
//! on this project's machines (BENCHMARKS.md, issue #9, session 12).
//!
//! The kernel is blake3's `platform::Platform::hash_many`, public but documented as
//! unstable: the crate is pinned to an exact version in `Cargo.toml`, and the tests below
//! compare every result with `blake3::hash`, so an upgrade that changes it fails them.

use std::sync::OnceLock;

use blake3::platform::Platform;
use blake3::IncrementCounter;

use crate::format::{BLOCK_SIZE, SUM_LEN};

/// Blocks hashed together by one pass (128 KiB): 128 chunks fill sixteen lanes eight
/// times; larger groups measured no faster.
const GROUP: usize = 32;
/// Fewer blocks than this are hashed one by one (see [`hash_group`]).
const SIDE_BY_SIDE_MIN: usize = 8;
/// Data at least this large is hashed on every core (rayon's pool), [`GROUP`] blocks per
/// task, on machines with at least [`PARALLEL_MIN_THREADS`]; below it handing out tasks
/// costs more than it saves.
const PARALLEL_MIN: usize = 256 * 1024;
/// Fewer threads in rayon's pool than this (cores, by default) and large inputs are hashed
/// on the calling thread. A caller outside the pool does not take part in the work: it
/// hands the tasks over and sleeps until they are done, so on two cores, which the NBD
/// client and the network stack share, the hand-over and wake-ups cost more than the
/// second core brings. Measured on a quiet 2-core machine (BENCHMARKS.md, issue #9,
/// session 15): 1M sequential reads 1.13-1.18x faster at QD8 and 1.23-1.28x at QD1
/// hashed on the calling thread, writes unchanged.
const PARALLEL_MIN_THREADS: usize = 4;

const CHUNK_LEN: usize = blake3::CHUNK_LEN;
const CHUNKS_PER_BLOCK: usize = BLOCK_SIZE / CHUNK_LEN;
/// BLAKE3's IV (the key words of an unkeyed hash), from the specification.
const IV: [u32; 8] = [
    0x6A09E667, 0xBB67AE85, 0x3C6EF372, 0xA54FF53A, 0x510E527F, 0x9B05688C, 0x1F83D9AB, 0x5BE0CD19,
];
/// BLAKE3's domain flags, from the specification.
const CHUNK_START: u8 = 1 << 0;
const CHUNK_END: u8 = 1 << 1;
const PARENT: u8 = 1 << 2;
const ROOT: u8 = 1 << 3;

// The tree below (4 chunks, 2 parents, 1 root) is the shape of a 4 KiB input only.
const _: () = assert!(CHUNKS_PER_BLOCK == 4 && SUM_LEN == blake3::OUT_LEN);

fn platform() -> Platform {
    static DETECTED: OnceLock<Platform> = OnceLock::new();
    *DETECTED.get_or_init(Platform::detect)
}

/// The checksums of the whole blocks of `data` (`SUM_LEN` bytes each, in order); a
/// trailing partial block is ignored. Large inputs are hashed on every core.
pub fn hash_blocks(data: &[u8]) -> Vec<u8> {
    let mut out = vec![0u8; data.len() / BLOCK_SIZE * SUM_LEN];
    hash_blocks_into(data, &mut out);
    out
}

/// As [`hash_blocks`], into `out` (at least `SUM_LEN` bytes per whole block of `data`).
pub(crate) fn hash_blocks_into(data: &[u8], out: &mut [u8]) {
    use rayon::prelude::*;
    let blocks = data.len() / BLOCK_SIZE;
    let data = &data[..blocks * BLOCK_SIZE];
    let out = &mut out[..blocks * SUM_LEN];
    if data.len() < PARALLEL_MIN || rayon::current_num_threads() < PARALLEL_MIN_THREADS {
        for (d, o) in data
            .chunks(GROUP * BLOCK_SIZE)
            .zip(out.chunks_mut(GROUP * SUM_LEN))
        {
            hash_group(d, o);
        }
        return;
    }
    data.par_chunks(GROUP * BLOCK_SIZE)
        .zip(out.par_chunks_mut(GROUP * SUM_LEN))
        .for_each(|(d, o)| hash_group(d, o));
}

/// Hashes up to [`GROUP`] whole blocks side by side.
fn hash_group(data: &[u8], out: &mut [u8]) {
    let n = data.len() / BLOCK_SIZE;
    debug_assert!(n <= GROUP && out.len() == n * SUM_LEN);
    if n < SIDE_BY_SIDE_MIN {
        // `blake3::hash` already hashes one block's four chunks side by side; a few
        // blocks together would fill no more lanes than that.
        for (block, h) in data
            .chunks_exact(BLOCK_SIZE)
            .zip(out.chunks_exact_mut(SUM_LEN))
        {
            h.copy_from_slice(blake3::hash(block).as_bytes());
        }
        return;
    }
    let p = platform();
    let mut one = [[0u8; SUM_LEN]; GROUP];
    let one = &mut one.as_flattened_mut()[..n * SUM_LEN];
    // Chaining values of every chunk, block by block, as the inputs of the block's two
    // parents: [c0 c1] and [c2 c3].
    let mut chunks = [[[0u8; 2 * SUM_LEN]; 2]; GROUP];
    for j in 0..CHUNKS_PER_BLOCK {
        // Chunk j of each block; only `inputs[..n]` is passed, so the rest is never read.
        let mut inputs: [&[u8; CHUNK_LEN]; GROUP] = [&[0u8; CHUNK_LEN]; GROUP];
        let nth = data
            .chunks_exact(CHUNK_LEN)
            .skip(j)
            .step_by(CHUNKS_PER_BLOCK);
        for (slot, chunk) in inputs.iter_mut().zip(nth) {
            // Always a whole chunk (chunks_exact).
            if let Ok(c) = <&[u8; CHUNK_LEN]>::try_from(chunk) {
                *slot = c;
            }
        }
        // Every block's chunk j has chunk counter j: the counter does not advance between
        // inputs, as it would for the chunks of one long input.
        p.hash_many(
            &inputs[..n],
            &IV,
            j as u64,
            IncrementCounter::No,
            0,
            CHUNK_START,
            CHUNK_END,
            one,
        );
        for (i, cv) in one.chunks_exact(SUM_LEN).enumerate() {
            chunks[i][j / 2][(j % 2) * SUM_LEN..][..SUM_LEN].copy_from_slice(cv);
        }
    }
    let mut parents = [[0u8; 2 * SUM_LEN]; GROUP];
    for half in 0..2 {
        let inputs: [&[u8; 2 * SUM_LEN]; GROUP] = std::array::from_fn(|i| &chunks[i][half]);
        p.hash_many(
            &inputs[..n],
            &IV,
            0,
            IncrementCounter::No,
            PARENT,
            0,
            0,
            one,
        );
        for (i, cv) in one.chunks_exact(SUM_LEN).enumerate() {
            parents[i][half * SUM_LEN..(half + 1) * SUM_LEN].copy_from_slice(cv);
        }
    }
    let roots: [&[u8; 2 * SUM_LEN]; GROUP] = std::array::from_fn(|i| &parents[i]);
    // A root node's 32-byte output is the first half of its compression, which is what
    // `hash_many` returns for a node flagged ROOT: the block's hash.
    p.hash_many(
        &roots[..n],
        &IV,
        0,
        IncrementCounter::No,
        PARENT | ROOT,
        0,
        0,
        out,
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn one_by_one(data: &[u8]) -> Vec<u8> {
        data.chunks_exact(BLOCK_SIZE)
            .flat_map(|b| *blake3::hash(b).as_bytes())
            .collect()
    }

    fn pattern(len: usize, seed: u32) -> Vec<u8> {
        (0..len as u32)
            .map(|i| (i.wrapping_add(seed).wrapping_mul(2654435761) >> 13) as u8)
            .collect()
    }

    #[test]
    fn every_count_of_blocks_hashes_as_blake3_does() {
        // One by one, side by side, group edges, the parallel threshold and beyond, and a
        // ragged tail.
        for blocks in [
            0, 1, 2, 3, 7, 8, 9, 15, 16, 31, 32, 33, 39, 63, 64, 65, 100, 256, 257,
        ] {
            let data = pattern(blocks * BLOCK_SIZE + 100, blocks as u32);
            let got = hash_blocks(&data);
            assert_eq!(got.len(), blocks * SUM_LEN);
            assert_eq!(got, one_by_one(&data), "{blocks} blocks");
        }
    }

    #[test]
    fn both_large_paths_hash_as_blake3_does() {
        // Large inputs are split over the pool only where it has enough threads: run them
        // in a pool too small and in one large enough, whatever this machine has.
        for threads in [1, PARALLEL_MIN_THREADS] {
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .unwrap();
            for blocks in [64, 65, 256, 257] {
                let data = pattern(blocks * BLOCK_SIZE, threads as u32);
                let got = pool.install(|| hash_blocks(&data));
                assert_eq!(got, one_by_one(&data), "{blocks} blocks, {threads} threads");
            }
        }
    }

    #[test]
    fn zero_and_identical_blocks_hash_as_blake3_does() {
        let data = vec![0u8; 40 * BLOCK_SIZE];
        assert_eq!(hash_blocks(&data), one_by_one(&data));
        let mut one = pattern(BLOCK_SIZE, 7);
        one.extend_from_within(..);
        one.extend_from_within(..);
        assert_eq!(hash_blocks(&one), one_by_one(&one));
    }

    proptest! {
        #[test]
        fn random_blocks_hash_as_blake3_does(
            blocks in 1usize..80,
            seed in any::<u64>(),
        ) {
            use rand::{RngCore, SeedableRng};
            let mut data = vec![0u8; blocks * BLOCK_SIZE];
            rand::rngs::StdRng::seed_from_u64(seed).fill_bytes(&mut data);
            prop_assert_eq!(hash_blocks(&data), one_by_one(&data));
        }
    }
}
