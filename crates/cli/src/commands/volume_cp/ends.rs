//! The two ends of a copy: where they are (parsing `vol:`, `quic://` and paths) and what
//! a copy does with them (size, allocation, read, write, zero, flush).

use std::net::{SocketAddr, ToSocketAddrs};
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{bail, Context};
use tessera_volume_client::{Credentials, Extent, Volume};

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

/// The first 4 bytes of a qcow2 image.
const QCOW2_MAGIC: &[u8; 4] = b"QFI\xfb";

/// An opened end.
pub enum End {
    /// A local file (regular, read or created).
    File(Arc<std::fs::File>),
    /// A volume over the QUIC export.
    Volume(Arc<Volume>),
}

impl End {
    /// Opens a local file to read, refusing what is not a raw image.
    pub fn read_file(path: &std::path::Path) -> anyhow::Result<End> {
        let f = std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
        let mut head = [0u8; 4];
        if f.read_at(&mut head, 0).ok() == Some(4) && &head == QCOW2_MAGIC {
            bail!(
                "{} is a qcow2 image: not supported yet (raw files only); convert it first \
                 with qemu-img convert -O raw",
                path.display()
            );
        }
        Ok(End::File(Arc::new(f)))
    }

    /// Creates (or replaces) a local file of `size` bytes, sparse until written.
    pub fn create_file(path: &std::path::Path, size: u64) -> anyhow::Result<End> {
        if path.extension().is_some_and(|e| e == "qcow2") {
            bail!(
                "{}: writing qcow2 images is not supported yet (raw files only); write a raw \
                 file and convert it with qemu-img convert -O qcow2",
                path.display()
            );
        }
        let f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .open(path)
            .with_context(|| format!("creating {}", path.display()))?;
        f.set_len(size)
            .with_context(|| format!("sizing {}", path.display()))?;
        Ok(End::File(Arc::new(f)))
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
            End::File(f) => Ok(f.metadata()?.len()),
            End::Volume(v) => Ok(v.size()),
        }
    }

    /// True when writes are refused (a snapshot).
    pub fn read_only(&self) -> bool {
        matches!(self, End::Volume(v) if v.read_only())
    }

    /// The allocation of `[offset, offset + len)`, covering it whole. A file is all data
    /// (its zeros are found by content).
    pub async fn extents(&self, offset: u64, len: u64) -> anyhow::Result<Vec<Extent>> {
        let End::Volume(v) = self else {
            return Ok(vec![Extent {
                length: len,
                flags: 0,
            }]);
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
            End::File(f) => {
                let f = f.clone();
                tokio::task::spawn_blocking(move || {
                    let mut buf = vec![0u8; len];
                    f.read_exact_at(&mut buf, offset).map(|()| buf)
                })
                .await?
                .context("reading the source file")
            }
        }
    }

    /// Writes `data` at `offset`.
    pub async fn write(&self, offset: u64, data: Vec<u8>) -> anyhow::Result<()> {
        match self {
            End::Volume(v) => Ok(v.write(offset, &data, false).await?),
            End::File(f) => {
                let f = f.clone();
                tokio::task::spawn_blocking(move || f.write_all_at(&data, offset))
                    .await?
                    .context("writing the destination file")
            }
        }
    }

    /// Makes `len` bytes at `offset` read as zeros: a trim on a volume, nothing on a file
    /// this copy created (it is sparse and empty).
    pub async fn zero(&self, offset: u64, len: u64) -> anyhow::Result<()> {
        match self {
            End::Volume(v) => Ok(v.trim(offset, len, false).await?),
            End::File(_) => Ok(()),
        }
    }

    /// Makes everything written durable.
    pub async fn flush(&self) -> anyhow::Result<()> {
        match self {
            End::Volume(v) => Ok(v.flush().await?),
            End::File(f) => {
                let f = f.clone();
                tokio::task::spawn_blocking(move || f.sync_all())
                    .await?
                    .context("syncing the destination file")
            }
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
