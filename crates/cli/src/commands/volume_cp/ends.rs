//! The two ends of a copy: where they are (parsing `vol:`, `quic://` and paths) and what
//! a copy does with them (size, allocation, read, write, zero, flush).

use std::net::{SocketAddr, ToSocketAddrs};
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{bail, Context};
use nix::fcntl::FallocateFlags;
use tessera_volume_client::proto::{EXTENT_HOLE, EXTENT_ZERO};
use tessera_volume_client::{Credentials, Extent, Volume};

use super::qcow2;
use crate::args::FileFormat;

/// An end as the user wrote it.
#[derive(Debug, PartialEq, Eq)]
pub enum Spec {
    /// `vol:NAME[@SNAPSHOT]`: looked up through the API.
    Api {
        /// The volume's name.
        volume: String,
        /// The export to open (`NAME` or `NAME@SNAPSHOT`).
        export: String,
    },
    /// `quic://HOST:PORT/EXPORT`.
    Direct {
        /// `HOST:PORT`.
        host_port: String,
        /// The export.
        export: String,
    },
    /// A local file.
    File(PathBuf),
}

/// Parses an end.
pub fn parse(s: &str) -> anyhow::Result<Spec> {
    if let Some(rest) = s.strip_prefix("vol:") {
        let volume = rest.split('@').next().unwrap_or_default();
        if volume.is_empty() {
            bail!("{s:?}: name a volume, as vol:NAME or vol:NAME@SNAPSHOT");
        }
        return Ok(Spec::Api {
            volume: volume.to_string(),
            export: rest.to_string(),
        });
    }
    if let Some(rest) = s.strip_prefix("quic://") {
        return match rest.split_once('/') {
            Some((hp, export)) if !hp.is_empty() && !export.is_empty() => Ok(Spec::Direct {
                host_port: hp.to_string(),
                export: export.to_string(),
            }),
            _ => bail!("{s:?}: write quic://HOST:PORT/EXPORT"),
        };
    }
    if s.is_empty() {
        bail!("an empty file name");
    }
    Ok(Spec::File(PathBuf::from(s)))
}

/// `HOST:PORT` as an address to reach and the name its certificate must carry.
pub fn resolve(host_port: &str) -> anyhow::Result<(SocketAddr, String)> {
    let addr = host_port
        .to_socket_addrs()
        .with_context(|| format!("{host_port:?} is not HOST:PORT"))?
        .next()
        .with_context(|| format!("{host_port:?} resolves to no address"))?;
    let host = match host_port.rsplit_once(':') {
        Some((h, _)) => h.trim_start_matches('[').trim_end_matches(']'),
        None => host_port,
    };
    Ok((addr, host.to_string()))
}

/// An opened end.
pub enum End {
    /// A local raw file; `fresh` when this copy created it (so it reads as zeros
    /// wherever it was not written).
    File {
        /// The file.
        file: Arc<std::fs::File>,
        /// Created empty by this copy.
        fresh: bool,
    },
    /// A qcow2 image read.
    Qcow2In(Arc<qcow2::Reader>),
    /// A qcow2 image written (fresh).
    Qcow2Out(Arc<qcow2::Writer>),
    /// A volume over the QUIC export.
    Volume(Arc<Volume>),
}

impl End {
    /// Opens a local file to read: qcow2 or raw as `format` says, else by its first bytes.
    pub fn read_file(path: &std::path::Path, format: Option<FileFormat>) -> anyhow::Result<End> {
        let f = std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
        let qcow2 = match format {
            Some(FileFormat::Raw) => false,
            Some(FileFormat::Qcow2) => true,
            None => qcow2::is_qcow2(&f),
        };
        if !qcow2 {
            return Ok(End::File {
                file: Arc::new(f),
                fresh: false,
            });
        }
        let r = qcow2::Reader::open(f)
            .with_context(|| format!("{}: refused, nothing copied", path.display()))?;
        Ok(End::Qcow2In(Arc::new(r)))
    }

    /// Opens the local destination of `size` bytes: a qcow2 image (`format`, or a name
    /// ending in `.qcow2`) or a raw file, created or replaced, sparse until written.
    /// With `resume` an existing file is kept: a raw file as it is (and sized), a qcow2
    /// image opened to write into (checked whole first: refused, it is left unchanged).
    pub fn create_file(
        path: &std::path::Path,
        size: u64,
        format: Option<FileFormat>,
        resume: bool,
    ) -> anyhow::Result<End> {
        let qcow2 = match format {
            Some(f) => f == FileFormat::Qcow2,
            None => path.extension().is_some_and(|e| e == "qcow2"),
        };
        if qcow2 && resume {
            let f = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(false)
                .open(path)
                .with_context(|| format!("opening {}", path.display()))?;
            // An empty file (a copy killed before it wrote the header) holds nothing
            // to continue: it gets a fresh image, as a missing one does.
            if f.metadata()?.len() > 0 {
                let w = qcow2::Writer::resume(f, size).with_context(|| {
                    format!(
                        "{}: cannot resume into it, the file is left unchanged",
                        path.display()
                    )
                })?;
                return Ok(End::Qcow2Out(Arc::new(w)));
            }
        }
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(!resume)
            .open(path)
            .with_context(|| format!("creating {}", path.display()))?;
        if qcow2 {
            f.set_len(0)
                .with_context(|| format!("emptying {}", path.display()))?;
            let w = qcow2::Writer::create(f, size)
                .with_context(|| format!("writing a qcow2 image in {}", path.display()))?;
            return Ok(End::Qcow2Out(Arc::new(w)));
        }
        f.set_len(size)
            .with_context(|| format!("sizing {}", path.display()))?;
        Ok(End::File {
            file: Arc::new(f),
            fresh: !resume,
        })
    }

    /// Opens a volume.
    pub async fn volume(host_port: &str, export: &str, creds: &Credentials) -> anyhow::Result<End> {
        let (addr, host) = resolve(host_port)?;
        let v = Volume::open(addr, &host, creds, export)
            .await
            .with_context(|| format!("opening {export} at {host_port} (QUIC export)"))?;
        Ok(End::Volume(Arc::new(v)))
    }

    /// Bytes.
    pub fn size(&self) -> anyhow::Result<u64> {
        match self {
            End::File { file, .. } => Ok(file.metadata()?.len()),
            End::Qcow2In(r) => Ok(r.size()),
            End::Qcow2Out(w) => Ok(w.size()),
            End::Volume(v) => Ok(v.size()),
        }
    }

    /// True when writes are refused (a snapshot).
    pub fn read_only(&self) -> bool {
        matches!(self, End::Volume(v) if v.read_only())
    }

    /// The allocation of `[offset, offset + len)`, covering it whole. A raw file is all
    /// data (its zeros are found by content); a qcow2 image's unallocated and zero
    /// clusters are zeros.
    pub async fn extents(&self, offset: u64, len: u64) -> anyhow::Result<Vec<Extent>> {
        let v = match self {
            End::Volume(v) => v,
            End::Qcow2In(r) => {
                return Ok(r
                    .extents(offset, len)
                    .into_iter()
                    .map(|(length, zero)| Extent {
                        length,
                        flags: if zero { EXTENT_HOLE | EXTENT_ZERO } else { 0 },
                    })
                    .collect())
            }
            _ => {
                return Ok(vec![Extent {
                    length: len,
                    flags: 0,
                }])
            }
        };
        let mut out = Vec::new();
        let mut at = offset;
        while at < offset + len {
            for e in v.block_status(at, offset + len - at).await? {
                let length = e.length.min(offset + len - at);
                out.push(Extent { length, ..e });
                at += length;
                if at >= offset + len {
                    break;
                }
            }
        }
        Ok(out)
    }

    /// Reads `len` bytes at `offset`.
    pub async fn read(&self, offset: u64, len: usize) -> anyhow::Result<Vec<u8>> {
        match self {
            End::Volume(v) => Ok(v.read(offset, len).await?),
            End::File { file, .. } => {
                let f = file.clone();
                tokio::task::spawn_blocking(move || {
                    let mut buf = vec![0u8; len];
                    f.read_exact_at(&mut buf, offset).map(|()| buf)
                })
                .await?
                .context("reading the file")
            }
            End::Qcow2In(r) => {
                let r = r.clone();
                Ok(tokio::task::spawn_blocking(move || r.read(offset, len)).await??)
            }
            End::Qcow2Out(w) => {
                let w = w.clone();
                Ok(tokio::task::spawn_blocking(move || w.read(offset, len)).await??)
            }
        }
    }

    /// The blake3 digest of `len` bytes at `offset` (at most one piece): computed by the
    /// store for a volume, here for a file.
    pub async fn digest(&self, offset: u64, len: u64) -> anyhow::Result<[u8; 32]> {
        match self {
            End::Volume(v) => Ok(v.digest(offset, len).await.context(
                "asking the store for a digest (a store older than --resume answers \
                 'not supported')",
            )?),
            _ => {
                let b = self.read(offset, len as usize).await?;
                Ok(*blake3::hash(&b).as_bytes())
            }
        }
    }

    /// Writes `data` at `offset`.
    pub async fn write(&self, offset: u64, data: Vec<u8>) -> anyhow::Result<()> {
        match self {
            End::Volume(v) => Ok(v.write(offset, &data, false).await?),
            End::File { file, .. } => {
                let f = file.clone();
                tokio::task::spawn_blocking(move || f.write_all_at(&data, offset))
                    .await?
                    .context("writing the destination file")
            }
            End::Qcow2Out(w) => {
                let w = w.clone();
                Ok(tokio::task::spawn_blocking(move || w.write(offset, &data)).await??)
            }
            End::Qcow2In(_) => bail!("a qcow2 source is not written"),
        }
    }

    /// Makes `len` bytes at `offset` read as zeros: a trim on a volume; nothing on a
    /// raw file this copy created (it reads as zeros where not written); a hole punched
    /// in a raw file kept by `--resume`; a qcow2 image's clusters there unmapped (none
    /// in an image this copy created).
    pub async fn zero(&self, offset: u64, len: u64) -> anyhow::Result<()> {
        match self {
            End::Volume(v) => Ok(v.trim(offset, len, false).await?),
            End::File { file, fresh: false } => {
                let f = file.clone();
                tokio::task::spawn_blocking(move || {
                    nix::fcntl::fallocate(
                        f.as_raw_fd(),
                        FallocateFlags::FALLOC_FL_PUNCH_HOLE | FallocateFlags::FALLOC_FL_KEEP_SIZE,
                        offset as i64,
                        len as i64,
                    )
                })
                .await?
                .context("punching a hole in the destination file")
            }
            End::File { fresh: true, .. } => Ok(()),
            End::Qcow2Out(w) => {
                let w = w.clone();
                Ok(tokio::task::spawn_blocking(move || w.zero(offset, len)).await??)
            }
            End::Qcow2In(_) => bail!("a qcow2 source is not written"),
        }
    }

    /// Makes everything written durable (a qcow2 image gets its tables and header).
    pub async fn flush(&self) -> anyhow::Result<()> {
        match self {
            End::Volume(v) => Ok(v.flush().await?),
            End::File { file, .. } => {
                let f = file.clone();
                tokio::task::spawn_blocking(move || f.sync_all())
                    .await?
                    .context("syncing the destination file")
            }
            End::Qcow2Out(w) => {
                let w = w.clone();
                Ok(tokio::task::spawn_blocking(move || w.finish()).await??)
            }
            End::Qcow2In(_) => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ends_parse_as_documented() {
        assert_eq!(
            parse("vol:disk0@before").unwrap(),
            Spec::Api {
                volume: "disk0".into(),
                export: "disk0@before".into()
            }
        );
        assert_eq!(
            parse("quic://10.0.0.1:10809/disk0").unwrap(),
            Spec::Direct {
                host_port: "10.0.0.1:10809".into(),
                export: "disk0".into()
            }
        );
        assert_eq!(
            parse("./disk.raw").unwrap(),
            Spec::File("./disk.raw".into())
        );
        for bad in ["vol:", "vol:@snap", "quic://host:1/", "quic://", ""] {
            assert!(parse(bad).is_err(), "{bad:?}");
        }
        assert_eq!(
            resolve("127.0.0.1:10809").unwrap(),
            ("127.0.0.1:10809".parse().unwrap(), "127.0.0.1".to_string())
        );
    }
}
