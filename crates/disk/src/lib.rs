//! Disk backends for VM block devices: a raw file or an NBD export.
//!
//! A virtio-blk device reads and writes through [`Disk`] and never knows what is behind
//! it. Backends do blocking I/O; the device calls them from its own I/O thread, never
//! from a vCPU.

#![forbid(unsafe_code)]

use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use nix::fcntl::{fallocate, FallocateFlags};
use tessera_nbd::client_pipelined::{Endpoint, Target, Timeouts, Tls};
use tessera_nbd::{ClientError, PipelinedClient};

/// Why a disk operation failed.
#[derive(Debug, thiserror::Error)]
pub enum DiskError {
    /// The backing file or connection failed.
    #[error("{0}")]
    Io(#[from] std::io::Error),
    /// The NBD server refused or the connection broke.
    #[error("{0}")]
    Nbd(#[from] ClientError),
    /// A request beyond the end of the disk.
    #[error("request at {offset}+{len} is beyond the disk's {size} bytes")]
    OutOfRange {
        /// Offset.
        offset: u64,
        /// Length.
        len: u64,
        /// Disk size.
        size: u64,
    },
    /// The disk specification could not be understood.
    #[error("bad disk {0:?}: {1}")]
    BadSpec(String, String),
    /// The backend cannot do this.
    #[error("{0} is not supported by this disk")]
    Unsupported(&'static str),
}

/// A block device's storage.
pub trait Disk: Send + Sync {
    /// Size in bytes.
    fn size(&self) -> u64;
    /// Whether writes are refused.
    fn read_only(&self) -> bool {
        false
    }
    /// Fills `buf` from `offset`.
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<(), DiskError>;
    /// Writes `data` at `offset`.
    fn write_at(&self, offset: u64, data: &[u8]) -> Result<(), DiskError>;
    /// Makes completed writes durable.
    fn flush(&self) -> Result<(), DiskError>;
    /// Discards a range (reads as zeroes afterwards, space may be freed).
    fn discard(&self, offset: u64, len: u64) -> Result<(), DiskError>;
    /// Zeroes a range.
    fn write_zeroes(&self, offset: u64, len: u64) -> Result<(), DiskError>;
    /// A short identifier for the guest (virtio-blk GET_ID), at most 20 bytes.
    fn id(&self) -> String;
}

fn check(offset: u64, len: u64, size: u64) -> Result<(), DiskError> {
    match offset.checked_add(len) {
        Some(end) if end <= size => Ok(()),
        _ => Err(DiskError::OutOfRange { offset, len, size }),
    }
}

/// A raw image file.
pub struct RawFile {
    file: File,
    size: u64,
    path: PathBuf,
}

impl RawFile {
    /// Opens an existing raw image read-write.
    pub fn open(path: &Path) -> Result<RawFile, DiskError> {
        let file = OpenOptions::new().read(true).write(true).open(path)?;
        let size = file.metadata()?.len();
        Ok(RawFile {
            file,
            size,
            path: path.to_path_buf(),
        })
    }

    fn punch(&self, mode: FallocateFlags, offset: u64, len: u64) -> Result<bool, DiskError> {
        let (Ok(o), Ok(l)) = (i64::try_from(offset), i64::try_from(len)) else {
            return Err(DiskError::OutOfRange {
                offset,
                len,
                size: self.size,
            });
        };
        match fallocate(self.file.as_raw_fd(), mode, o, l) {
            Ok(()) => Ok(true),
            Err(nix::errno::Errno::EOPNOTSUPP) => Ok(false),
            Err(e) => Err(DiskError::Io(e.into())),
        }
    }
}

impl Disk for RawFile {
    fn size(&self) -> u64 {
        self.size
    }
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<(), DiskError> {
        check(offset, buf.len() as u64, self.size)?;
        Ok(self.file.read_exact_at(buf, offset)?)
    }
    fn write_at(&self, offset: u64, data: &[u8]) -> Result<(), DiskError> {
        check(offset, data.len() as u64, self.size)?;
        Ok(self.file.write_all_at(data, offset)?)
    }
    fn flush(&self) -> Result<(), DiskError> {
        Ok(self.file.sync_data()?)
    }
    fn discard(&self, offset: u64, len: u64) -> Result<(), DiskError> {
        check(offset, len, self.size)?;
        let mode = FallocateFlags::FALLOC_FL_PUNCH_HOLE | FallocateFlags::FALLOC_FL_KEEP_SIZE;
        if !self.punch(mode, offset, len)? {
            self.write_zeroes(offset, len)?;
        }
        Ok(())
    }
    fn write_zeroes(&self, offset: u64, len: u64) -> Result<(), DiskError> {
        check(offset, len, self.size)?;
        let mode = FallocateFlags::FALLOC_FL_ZERO_RANGE | FallocateFlags::FALLOC_FL_KEEP_SIZE;
        if self.punch(mode, offset, len)? {
            return Ok(());
        }
        let zeroes = vec![0u8; 1 << 20];
        let mut at = offset;
        while at < offset + len {
            let n = (offset + len - at).min(zeroes.len() as u64) as usize;
            self.file.write_all_at(&zeroes[..n], at)?;
            at += n as u64;
        }
        Ok(())
    }
    fn id(&self) -> String {
        let name = self
            .path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        name.chars().take(20).collect()
    }
}

/// How an NBD disk connects: TLS credentials and the per-request timeout. The URI says
/// where; these say what the URI cannot (or should not: keys do not belong in a spec
/// that is logged).
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NbdOptions {
    /// CA certificate (PEM) the server's certificate must chain to (`nbds://` only).
    #[serde(default)]
    pub tls_ca: Option<PathBuf>,
    /// This client's certificate (PEM).
    #[serde(default)]
    pub tls_cert: Option<PathBuf>,
    /// This client's private key (PEM).
    #[serde(default)]
    pub tls_key: Option<PathBuf>,
    /// The name the server's certificate must hold; default the URI's host.
    #[serde(default)]
    pub tls_hostname: Option<String>,
    /// Milliseconds a request may take, reconnections included; default 30000.
    #[serde(default)]
    pub timeout_ms: Option<u64>,
    /// The key that shows the store this client is the VM's own VMM (issue #8: while a
    /// VM runs, only its VMM writes its volume), sent after the export's name
    /// (`tessera_nbd::export_name`). Never serialized: not into a snapshot, a migration's
    /// stream or an API answer; each VMM gets its own from `tesserad`.
    #[serde(skip)]
    pub writer_key: Option<WriterKey>,
}

/// A VMM's writer key: its `Debug` never shows it.
#[derive(Clone, PartialEq, Eq)]
pub struct WriterKey(pub String);

impl std::fmt::Debug for WriterKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("WriterKey(..)")
    }
}

/// Default per-request timeout of an NBD disk.
pub const DEFAULT_NBD_TIMEOUT: Duration = Duration::from_secs(30);

/// An NBD export (for example a Tessera volume served by the local `tessera-store`),
/// with requests pipelined on one connection that is re-established when it breaks.
pub struct NbdDisk {
    client: PipelinedClient,
    export: String,
}

/// A parsed NBD URI.
#[derive(Debug, PartialEq, Eq)]
struct NbdUri {
    endpoint: Endpoint,
    export: String,
    tls: bool,
    /// `HOST` of `HOST:PORT` (for the certificate check).
    host: Option<String>,
    certificates: Option<PathBuf>,
    hostname: Option<String>,
}

fn parse_uri(uri: &str) -> Result<NbdUri, DiskError> {
    let bad = |why: &str| DiskError::BadSpec(uri.to_string(), why.to_string());
    let (scheme, rest) = uri.split_once("://").ok_or_else(|| {
        bad("expected nbd[s]://HOST:PORT/EXPORT or nbd[s]+unix:///EXPORT?socket=PATH")
    })?;
    let (tls, unix) = match scheme {
        "nbd" => (false, false),
        "nbds" => (true, false),
        "nbd+unix" => (false, true),
        "nbds+unix" => (true, true),
        _ => return Err(bad("unknown scheme (nbd, nbds, nbd+unix, nbds+unix)")),
    };
    let (rest, query) = match rest.split_once('?') {
        Some((r, q)) => (r, Some(q)),
        None => (rest, None),
    };
    // The export name and query values are percent-encoded (NBD URI spec, as libnbd
    // and qemu read them): `%20` is a space, `%2F` a slash inside an export name.
    let decode = |what: &str, v: &str| -> Result<String, DiskError> {
        // percent_decode passes a '%' not followed by two hex digits through; a URI
        // with one is malformed, and guessing what it meant could name another export.
        let escapes_ok = v
            .split('%')
            .skip(1)
            .all(|h| h.len() >= 2 && h.as_bytes()[..2].iter().all(u8::is_ascii_hexdigit));
        if !escapes_ok {
            return Err(bad(&format!("{what} {v:?}: '%' must start a %XX escape")));
        }
        percent_encoding::percent_decode_str(v)
            .decode_utf8()
            .map(|d| d.into_owned())
            .map_err(|_| bad(&format!("{what} {v:?} is not UTF-8 once decoded")))
    };
    let (mut socket, mut certificates, mut hostname) = (None, None, None);
    for pair in query.into_iter().flat_map(|q| q.split('&')) {
        let unexpected = || bad(&format!("unexpected query parameter {pair:?}"));
        let (key, raw) = pair.split_once('=').ok_or_else(unexpected)?;
        let v = decode(key, raw)?;
        match key {
            "socket" if unix && !v.is_empty() => socket = Some(PathBuf::from(v)),
            "tls-certificates" if tls && !v.is_empty() => certificates = Some(PathBuf::from(v)),
            "tls-hostname" if tls && !v.is_empty() => hostname = Some(v),
            _ => return Err(unexpected()),
        }
    }
    let (endpoint, export, host) = if unix {
        let export = rest
            .strip_prefix('/')
            .ok_or_else(|| bad("expected nbd+unix:///EXPORT?socket=PATH"))?;
        let socket = socket.ok_or_else(|| bad("missing ?socket="))?;
        (Endpoint::Unix(socket), decode("export name", export)?, None)
    } else {
        let (addr, export) = rest.split_once('/').ok_or_else(|| bad("missing /EXPORT"))?;
        if addr.is_empty() {
            return Err(bad("missing HOST:PORT"));
        }
        let host = match addr.rsplit_once(':') {
            Some((h, _)) => h,
            None => addr,
        };
        let host = host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_string();
        (
            Endpoint::Tcp(addr.to_string()),
            decode("export name", export)?,
            Some(host),
        )
    };
    Ok(NbdUri {
        endpoint,
        export,
        tls,
        host,
        certificates,
        hostname,
    })
}

impl NbdDisk {
    /// Connects to `nbd://HOST:PORT/EXPORT` or `nbd+unix:///EXPORT?socket=PATH` in plain
    /// text, with the default timeout.
    pub fn connect(uri: &str) -> Result<NbdDisk, DiskError> {
        Self::connect_with(uri, &NbdOptions::default())
    }

    /// Connects to an NBD URI: `nbd://`, `nbd+unix://`, or with TLS `nbds://HOST:PORT/EXPORT`
    /// and `nbds+unix:///EXPORT?socket=PATH`. TLS credentials come from `opts` or, as
    /// libnbd does it, `?tls-certificates=DIR` (holding `ca-cert.pem`, `client-cert.pem`
    /// and `client-key.pem`); `?tls-hostname=NAME` names the server's certificate.
    pub fn connect_with(uri: &str, opts: &NbdOptions) -> Result<NbdDisk, DiskError> {
        let bad = |why: &str| DiskError::BadSpec(uri.to_string(), why.to_string());
        let u = parse_uri(uri)?;
        let files = match (&opts.tls_ca, &opts.tls_cert, &opts.tls_key, &u.certificates) {
            (None, None, None, None) => None,
            (Some(ca), Some(cert), Some(key), None) => {
                Some((ca.clone(), cert.clone(), key.clone()))
            }
            (None, None, None, Some(dir)) => Some((
                dir.join("ca-cert.pem"),
                dir.join("client-cert.pem"),
                dir.join("client-key.pem"),
            )),
            (_, _, _, Some(_)) => {
                return Err(bad("TLS credentials both in the URI and as options"))
            }
            _ => {
                return Err(bad(
                    "TLS needs all of a CA certificate, a client certificate and its key",
                ))
            }
        };
        let tls = match (u.tls, files) {
            (false, None) => None,
            (false, Some(_)) => {
                return Err(bad("TLS credentials given for a plain nbd:// URI (use nbds://)"))
            }
            (true, None) => return Err(bad(
                "nbds:// needs TLS credentials (a CA, client certificate and key, or ?tls-certificates=DIR)",
            )),
            (true, Some((ca, cert, key))) => {
                let name = opts
                    .tls_hostname
                    .clone()
                    .or(u.hostname.clone())
                    .or(u.host.clone())
                    .ok_or_else(|| bad("nbds+unix:// needs a TLS hostname (?tls-hostname=NAME)"))?;
                Some(Tls::from_pem_files(&ca, &cert, &key, &name)?)
            }
        };
        let request = opts
            .timeout_ms
            .map_or(DEFAULT_NBD_TIMEOUT, Duration::from_millis);
        let timeouts = Timeouts {
            request,
            connect: request.min(Timeouts::default().connect),
        };
        let export = match &opts.writer_key {
            Some(WriterKey(key)) => tessera_nbd::export_name::with_credential(&u.export, key),
            None => u.export.clone(),
        };
        let target = Target {
            endpoint: u.endpoint,
            export,
            tls,
        };
        Ok(NbdDisk {
            client: PipelinedClient::connect(target, timeouts)?,
            export: u.export,
        })
    }
}

/// Largest single NBD request we send (the server's advertised maximum is larger).
const NBD_CHUNK: usize = 16 << 20;

impl Disk for NbdDisk {
    fn size(&self) -> u64 {
        self.client.size()
    }
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<(), DiskError> {
        check(offset, buf.len() as u64, self.size())?;
        for (i, chunk) in buf.chunks_mut(NBD_CHUNK).enumerate() {
            let data = self
                .client
                .read(offset + (i * NBD_CHUNK) as u64, chunk.len() as u32)?;
            chunk.copy_from_slice(&data);
        }
        Ok(())
    }
    fn write_at(&self, offset: u64, data: &[u8]) -> Result<(), DiskError> {
        check(offset, data.len() as u64, self.size())?;
        for (i, chunk) in data.chunks(NBD_CHUNK).enumerate() {
            self.client
                .write(offset + (i * NBD_CHUNK) as u64, chunk.to_vec(), false)?;
        }
        Ok(())
    }
    fn flush(&self) -> Result<(), DiskError> {
        Ok(self.client.flush()?)
    }
    fn discard(&self, offset: u64, len: u64) -> Result<(), DiskError> {
        check(offset, len, self.size())?;
        Ok(chunked(offset, len, |o, l| self.client.trim(o, l))?)
    }
    fn write_zeroes(&self, offset: u64, len: u64) -> Result<(), DiskError> {
        check(offset, len, self.size())?;
        Ok(chunked(offset, len, |o, l| {
            self.client.write_zeroes(o, l, false)
        })?)
    }
    fn id(&self) -> String {
        self.export.chars().take(20).collect()
    }
}

fn chunked(
    offset: u64,
    len: u64,
    mut f: impl FnMut(u64, u32) -> Result<(), ClientError>,
) -> Result<(), ClientError> {
    let mut at = offset;
    while at < offset + len {
        let n = (offset + len - at).min(1 << 30);
        f(at, n as u32)?;
        at += n;
    }
    Ok(())
}

/// Opens a disk from a path or an NBD URI (plain NBD, default timeout).
pub fn open(spec: &str) -> Result<Box<dyn Disk>, DiskError> {
    open_with(spec, &NbdOptions::default())
}

/// Whether `spec` is an NBD URI rather than a file path.
pub fn is_nbd(spec: &str) -> bool {
    ["nbd://", "nbds://", "nbd+unix://", "nbds+unix://"]
        .iter()
        .any(|p| spec.starts_with(p))
}

/// Opens a disk from a path or an NBD URI, NBD connections set up with `opts`.
pub fn open_with(spec: &str, opts: &NbdOptions) -> Result<Box<dyn Disk>, DiskError> {
    if is_nbd(spec) {
        Ok(Box::new(NbdDisk::connect_with(spec, opts)?))
    } else {
        Ok(Box::new(RawFile::open(Path::new(spec))?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nbd_uris_parse_like_libnbd() {
        let u = parse_uri(
            "nbds://[::1]:10809/vol-1?tls-certificates=/etc/pki&tls-hostname=n1.node.tessera",
        )
        .unwrap();
        assert_eq!(u.endpoint, Endpoint::Tcp("[::1]:10809".into()));
        assert_eq!(u.export, "vol-1");
        assert!(u.tls);
        assert_eq!(u.host.as_deref(), Some("::1"));
        assert_eq!(u.certificates.as_deref(), Some(Path::new("/etc/pki")));
        assert_eq!(u.hostname.as_deref(), Some("n1.node.tessera"));
        let u = parse_uri("nbd+unix:///v?socket=/run/s.sock").unwrap();
        assert_eq!(u.endpoint, Endpoint::Unix("/run/s.sock".into()));
        assert!(!u.tls);
        // Percent-encoded export names and query values, decoded as libnbd does.
        let u = parse_uri("nbd+unix:///my%20disk%2Fa%40s?socket=/run/a%20b.sock").unwrap();
        assert_eq!(u.export, "my disk/a@s");
        assert_eq!(u.endpoint, Endpoint::Unix("/run/a b.sock".into()));
        let u = parse_uri("nbds://h:1/%C3%A9t%C3%A9?tls-hostname=n%2D1").unwrap();
        assert_eq!(u.export, "été");
        assert_eq!(u.hostname.as_deref(), Some("n-1"));
        assert_eq!(parse_uri("nbd://h:1/").unwrap().export, "");
        let opts = NbdOptions {
            tls_ca: Some("/nonexistent/ca.pem".into()),
            ..NbdOptions::default()
        };
        assert!(matches!(
            open_with("nbds://127.0.0.1:1/v", &opts),
            Err(DiskError::BadSpec(..))
        ));
    }

    #[test]
    fn raw_file_reads_writes_discards_and_refuses_out_of_range() {
        let f = tempfile::NamedTempFile::new().unwrap();
        f.as_file().set_len(1 << 20).unwrap();
        let d = RawFile::open(f.path()).unwrap();
        d.write_at(4096, &[7; 4096]).unwrap();
        let mut buf = [0u8; 4096];
        d.read_at(4096, &mut buf).unwrap();
        assert_eq!(buf, [7; 4096]);
        d.discard(4096, 4096).unwrap();
        d.read_at(4096, &mut buf).unwrap();
        assert_eq!(buf, [0; 4096]);
        d.write_at(0, &[1; 512]).unwrap();
        d.write_zeroes(0, 512).unwrap();
        d.read_at(0, &mut buf[..512]).unwrap();
        assert_eq!(buf[..512], [0; 512]);
        assert!(matches!(
            d.write_at((1 << 20) - 1, &[0; 2]),
            Err(DiskError::OutOfRange { .. })
        ));
        assert!(matches!(
            d.read_at(u64::MAX, &mut buf),
            Err(DiskError::OutOfRange { .. })
        ));
        d.flush().unwrap();
    }

    #[test]
    fn bad_specs_are_explained() {
        for spec in [
            "nbd+unix:///vol",
            "nbd://host-without-export",
            "nbd+unix:///v?sock=x",
            "nbds://127.0.0.1:1/v",
            "nbds+unix:///v?socket=/x&tls-certificates=/d",
            "nbd://127.0.0.1:1/v?tls-certificates=/d",
            "nbd+unix:///v?socket=/x&bogus=1",
            "nbd+unix:///v?socket",
            "nbd://h:1/100%",
            "nbd://h:1/a%zzb",
            "nbd://h:1/a%4",
            "nbd://h:1/%FF%FE",
            "nbd+unix:///v?socket=/x%2",
        ] {
            assert!(matches!(open(spec), Err(DiskError::BadSpec(..))), "{spec}");
        }
    }
}
