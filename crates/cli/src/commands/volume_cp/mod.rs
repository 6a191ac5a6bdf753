//! `tessera volume cp SRC DST`: copies between a volume (or snapshot) and a local raw
//! or qcow2 file, or between two volumes, over the stores' QUIC export
//! (docs/volume-export.md). Ranges the source reports as zeros (block status, qcow2's
//! unallocated clusters) or that read as zeros are not sent: a file destination stays
//! sparse, a volume destination gets them trimmed. `--resume` compares the blake3
//! digests of each piece on both ends first and copies only the pieces that differ.

mod ends;
mod qcow2;

use std::io::IsTerminal;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use tessera_api::{NbdCredentials, VolumeView};
use tessera_units::format_size;
use tessera_volume_client::proto::MAX_DATA;
use tessera_volume_client::Credentials;

use crate::args::{CpArgs, FileFormat};
use crate::client::{decode, Client};
use crate::endpoints::{NBD_CREDS, VOLUME};
use crate::output::Output;
use ends::{parse, End, Spec};

/// Pieces copied at once: enough to keep a QUIC connection's window busy.
const IN_FLIGHT: usize = 8;

/// Runs the copy; `client` is needed only for `vol:` ends.
pub fn run(client: Option<&Client>, args: CpArgs, out: Output) -> anyhow::Result<()> {
    let (src, dst) = (parse(&args.src)?, parse(&args.dst)?);
    if let (Spec::File(a), Spec::File(b)) = (&src, &dst) {
        bail!(
            "{} and {}: one end must be a volume (vol:NAME or quic://HOST:PORT/EXPORT)",
            a.display(),
            b.display()
        );
    }
    // Where each volume end is, and credentials for them, through the API when asked.
    let mut creds = match &args.creds {
        Some(dir) => Some(Credentials::from_dir(dir)?),
        None => None,
    };
    let mut locate = |spec: Spec| -> anyhow::Result<Spec> {
        let Spec::Api { volume, export } = spec else {
            if matches!(spec, Spec::Direct { .. }) && creds.is_none() {
                bail!("a quic:// end needs --creds DIR (from tessera volume export-creds)");
            }
            return Ok(spec);
        };
        let client = client.context("vol: ends need the API")?;
        let v: VolumeView = decode(VOLUME, &client.call(VOLUME, &[&volume], None)?)?;
        let uri = v.volume.nbd.with_context(|| {
            format!("volume {volume} has no export address (its store has no TCP address)")
        })?;
        let host_port = uri
            .split_once("://")
            .and_then(|(_, rest)| rest.split('/').next())
            .with_context(|| format!("volume {volume}: unreadable export address {uri:?}"))?
            .to_string();
        if creds.is_none() {
            let c: NbdCredentials = decode(NBD_CREDS, &client.call(NBD_CREDS, &[], None)?)?;
            creds = Some(Credentials {
                ca_pem: c.ca_cert_pem,
                cert_pem: c.client_cert_pem,
                key_pem: c.client_key_pem,
            });
        }
        // The QUIC export listens on the NBD port's number, over UDP.
        Ok(Spec::Direct { host_port, export })
    };
    let (src, dst) = (locate(src)?, locate(dst)?);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let how = How {
        format: args.format,
        resume: args.resume,
    };
    let stats = rt.block_on(copy_specs(src, dst, creds, how))?;
    let secs = stats.elapsed.as_secs_f64().max(1e-6);
    if out.is_json() {
        out.print(
            &serde_json::json!({
                "bytes": stats.size, "data_bytes": stats.data,
                "zero_bytes": stats.size - stats.data - stats.same,
                "same_bytes": stats.same, "seconds": secs,
            }),
            |_| {},
        );
    } else {
        let same = if args.resume {
            format!(", {} already equal", format_size(stats.same))
        } else {
            String::new()
        };
        println!(
            "copied {} from {} to {}: {} of data, {} skipped as zeros{same}, in {secs:.1} s \
             ({}/s)",
            format_size(stats.size),
            args.src,
            args.dst,
            format_size(stats.data),
            format_size(stats.size - stats.data - stats.same),
            format_size((stats.size as f64 / secs) as u64)
        );
    }
    Ok(())
}

/// What a copy did.
struct Stats {
    size: u64,
    /// Bytes of data sent.
    data: u64,
    /// Bytes not copied because their pieces' digests were equal (`--resume`).
    same: u64,
    elapsed: Duration,
}

/// How to copy: the local file's format, and whether to resume.
#[derive(Clone, Copy)]
struct How {
    format: Option<FileFormat>,
    resume: bool,
}

async fn open(
    spec: Spec,
    creds: Option<&Credentials>,
    size: Option<u64>,
    how: How,
) -> anyhow::Result<End> {
    match spec {
        Spec::File(p) => match size {
            None => End::read_file(&p, how.format),
            Some(n) => End::create_file(&p, n, how.format, how.resume),
        },
        Spec::Direct { host_port, export } => {
            let creds = creds.context("no credentials for the QUIC export")?;
            End::volume(&host_port, &export, creds).await
        }
        Spec::Api { .. } => bail!("a vol: end was not located"),
    }
}

async fn copy_specs(
    src: Spec,
    dst: Spec,
    creds: Option<Credentials>,
    how: How,
) -> anyhow::Result<Stats> {
    let source = open(src, creds.as_ref(), None, how).await?;
    let size = source.size()?;
    let dest = match open(dst, creds.as_ref(), Some(size), how).await {
        Ok(d) => d,
        Err(e) => {
            hang_up(source).await;
            return Err(e);
        }
    };
    if dest.read_only() {
        hang_up(source).await;
        hang_up(dest).await;
        bail!("the destination is a snapshot: snapshots are read-only");
    }
    let room = dest.size()?;
    if room < size {
        hang_up(source).await;
        hang_up(dest).await;
        bail!(
            "the source ({size} bytes) is larger than the destination volume ({room} bytes): \
             nothing copied"
        );
    }
    let (source, dest) = (Arc::new(source), Arc::new(dest));
    let done = copy(source.clone(), dest.clone(), size, how.resume).await;
    for end in [source, dest] {
        if let Ok(end) = Arc::try_unwrap(end) {
            hang_up(end).await;
        }
    }
    done
}

/// Closes a volume's connection properly, or the store keeps the volume open until its
/// idle timeout (and refuses to delete it meanwhile).
async fn hang_up(end: End) {
    if let End::Volume(v) = end {
        if let Ok(v) = Arc::try_unwrap(v) {
            v.close().await;
        }
    }
}

/// Copies `size` bytes in pieces of the protocol's largest request, [`IN_FLIGHT`] at a
/// time (with `resume`, only the pieces whose digests differ), then flushes the
/// destination.
async fn copy(src: Arc<End>, dst: Arc<End>, size: u64, resume: bool) -> anyhow::Result<Stats> {
    let started = Instant::now();
    let done = Arc::new(AtomicU64::new(0));
    let data = Arc::new(AtomicU64::new(0));
    let same = Arc::new(AtomicU64::new(0));
    let bar = std::io::stderr()
        .is_terminal()
        .then(|| tokio::spawn(draw(done.clone(), size)));
    let mut tasks = tokio::task::JoinSet::new();
    let mut next = 0u64;
    let mut failed = None;
    loop {
        while failed.is_none() && next < size && tasks.len() < IN_FLIGHT {
            let len = (size - next).min(MAX_DATA);
            let (s, d, dn, da) = (src.clone(), dst.clone(), done.clone(), data.clone());
            let sm = same.clone();
            tasks.spawn(async move {
                if resume && equal(&s, &d, next, len).await? {
                    sm.fetch_add(len, Ordering::Relaxed);
                } else {
                    let copied = piece(&s, &d, next, len).await?;
                    da.fetch_add(copied, Ordering::Relaxed);
                }
                dn.fetch_add(len, Ordering::Relaxed);
                anyhow::Ok(())
            });
            next += len;
        }
        let Some(res) = tasks.join_next().await else {
            break;
        };
        if let Err(e) = res.map_err(anyhow::Error::from).and_then(|r| r) {
            failed.get_or_insert(e);
        }
    }
    if let Some(b) = bar {
        b.abort();
        eprintln!();
    }
    if let Some(e) = failed {
        return Err(e.context(format!(
            "the copy failed after {} of {} (the destination is partly written; \
             the same command with --resume continues it)",
            format_size(done.load(Ordering::Relaxed)),
            format_size(size)
        )));
    }
    dst.flush().await?;
    Ok(Stats {
        size,
        data: data.load(Ordering::Relaxed),
        same: same.load(Ordering::Relaxed),
        elapsed: started.elapsed(),
    })
}

/// True when the piece's bytes are the same on both ends (blake3 digests; a volume's
/// is computed by its store, so the piece itself does not travel).
async fn equal(src: &End, dst: &End, offset: u64, len: u64) -> anyhow::Result<bool> {
    let (a, b) = tokio::try_join!(src.digest(offset, len), dst.digest(offset, len))?;
    Ok(a == b)
}

/// Copies one piece; returns the bytes of data sent (not zeros).
async fn piece(src: &End, dst: &End, offset: u64, len: u64) -> anyhow::Result<u64> {
    let mut at = offset;
    let mut sent = 0;
    for e in src.extents(offset, len).await? {
        if e.is_zero() {
            dst.zero(at, e.length).await?;
        } else {
            let buf = src.read(at, e.length as usize).await?;
            for (start, end, zero) in runs(&buf) {
                let off = at + start as u64;
                if zero {
                    dst.zero(off, (end - start) as u64).await?;
                } else {
                    dst.write(off, buf[start..end].to_vec()).await?;
                    sent += (end - start) as u64;
                }
            }
        }
        at += e.length;
    }
    Ok(sent)
}

/// Zeros are looked for in pieces this large: a file's data and a volume's allocated
/// blocks often hold long runs of zeros that need not travel nor take space.
const ZERO_GRAIN: usize = 64 << 10;

/// `buf` as runs `(start, end, all zeros)` of whole [`ZERO_GRAIN`] pieces, neighbours
/// of the same kind merged.
fn runs(buf: &[u8]) -> Vec<(usize, usize, bool)> {
    let mut out: Vec<(usize, usize, bool)> = Vec::new();
    for (i, grain) in buf.chunks(ZERO_GRAIN).enumerate() {
        let (start, zero) = (i * ZERO_GRAIN, grain.iter().all(|b| *b == 0));
        match out.last_mut() {
            Some(last) if last.2 == zero => last.1 = start + grain.len(),
            _ => out.push((start, start + grain.len(), zero)),
        }
    }
    out
}

/// Draws the progress bar on standard error until aborted.
async fn draw(done: Arc<AtomicU64>, size: u64) {
    loop {
        let d = done.load(Ordering::Relaxed);
        let pct = (d * 100).checked_div(size).unwrap_or(100) as usize;
        let filled = pct * 30 / 100;
        eprint!(
            "\r[{}{}] {pct:>3}% {} of {}   ",
            "#".repeat(filled),
            " ".repeat(30 - filled),
            format_size(d),
            format_size(size)
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zero_runs_are_found_in_whole_grains_and_merged() {
        let mut buf = vec![0u8; 5 * ZERO_GRAIN + 10];
        buf[ZERO_GRAIN + 1] = 1;
        buf[2 * ZERO_GRAIN] = 1;
        buf[5 * ZERO_GRAIN + 9] = 1;
        assert_eq!(
            runs(&buf),
            vec![
                (0, ZERO_GRAIN, true),
                (ZERO_GRAIN, 3 * ZERO_GRAIN, false),
                (3 * ZERO_GRAIN, 5 * ZERO_GRAIN, true),
                (5 * ZERO_GRAIN, 5 * ZERO_GRAIN + 10, false),
            ]
        );
        assert!(runs(&[]).is_empty());
    }
}
