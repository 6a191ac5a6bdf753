//! What the server serves: a set of named exports, each a block device. The store (or a
//! test) implements these; the server never knows what is behind them.

use std::sync::Arc;

use crate::proto::Errno;

/// An error from a device, carried to the client as an errno and a message.
#[derive(Debug, Clone)]
pub struct DeviceError {
    /// The errno sent to the client.
    pub errno: Errno,
    /// A human-readable reason (sent in structured error replies, and logged).
    pub message: String,
}

impl DeviceError {
    /// Builds an error.
    pub fn new(errno: Errno, message: impl Into<String>) -> DeviceError {
        DeviceError {
            errno,
            message: message.into(),
        }
    }
}

/// One run of a `base:allocation` reply.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Extent {
    /// Length in bytes.
    pub length: u64,
    /// `STATE_HOLE` / `STATE_ZERO` bits.
    pub flags: u32,
}

/// The completion of a [`Device::write_remote`].
pub type RemoteWrite =
    std::pin::Pin<Box<dyn std::future::Future<Output = Result<(), DeviceError>> + Send>>;

/// The completion of a [`Device::read_remote`]: the bytes read.
pub type RemoteRead =
    std::pin::Pin<Box<dyn std::future::Future<Output = Result<Vec<u8>, DeviceError>> + Send>>;

/// The completion of a [`Device::extents_remote`].
pub type RemoteExtents =
    std::pin::Pin<Box<dyn std::future::Future<Output = Result<Vec<Extent>, DeviceError>> + Send>>;

/// A block device behind an export. Calls may block briefly (page-cache I/O); the server
/// moves the ones that sync to disk (`flush`, anything with `fua`) off its async workers.
pub trait Device: Send + Sync + 'static {
    /// Size in bytes.
    fn size(&self) -> u64;
    /// Whether writes are refused.
    fn read_only(&self) -> bool;
    /// Fills `buf` from `offset`.
    fn read(&self, offset: u64, buf: &mut [u8]) -> Result<(), DeviceError>;
    /// Writes `data` at `offset`.
    fn write(&self, offset: u64, data: &[u8], fua: bool) -> Result<(), DeviceError>;
    /// Writes `data` at `offset`, taking the buffer (devices that keep it avoid a copy).
    fn write_owned(&self, offset: u64, data: Vec<u8>, fua: bool) -> Result<(), DeviceError> {
        self.write(offset, &data, fua)
    }
    /// True when writes complete elsewhere, after a network round trip (a replicated
    /// volume's primary waits for its replicas): the server then writes through
    /// [`Device::write_remote`] and awaits it on a task of its own, reading the client's
    /// next requests meanwhile, so writes pipeline without holding a thread each.
    fn remote_writes(&self) -> bool {
        false
    }
    /// Starts a write and returns its completion (see [`Device::remote_writes`]). The
    /// default writes at once, as [`Device::write_owned`].
    fn write_remote(&self, offset: u64, data: Vec<u8>, fua: bool) -> RemoteWrite {
        Box::pin(std::future::ready(self.write_owned(offset, data, fua)))
    }
    /// True when reads and block status complete elsewhere, after a network round trip
    /// (a store forwarding its client to another node's): the server then reads through
    /// [`Device::read_remote`] and [`Device::extents_remote`] and awaits them on tasks of
    /// their own, reading the client's next requests meanwhile, so a client's reads are in
    /// flight together instead of each holding a thread for its round trip. A device whose
    /// reads hit the page cache keeps the default: read inline, no task per read.
    fn remote_reads(&self) -> bool {
        false
    }
    /// Starts a read of `len` bytes at `offset` and returns its completion (see
    /// [`Device::remote_reads`]). The default reads at once, as [`Device::read`].
    fn read_remote(&self, offset: u64, len: usize) -> RemoteRead {
        let mut buf = vec![0u8; len];
        let res = self.read(offset, &mut buf).map(|()| buf);
        Box::pin(std::future::ready(res))
    }
    /// Starts a block status query and returns its completion (see
    /// [`Device::remote_reads`]). The default answers at once, as [`Device::extents`].
    fn extents_remote(&self, offset: u64, len: u64) -> RemoteExtents {
        Box::pin(std::future::ready(self.extents(offset, len)))
    }
    /// Makes all completed writes durable.
    fn flush(&self) -> Result<(), DeviceError>;
    /// Discards a range.
    fn trim(&self, offset: u64, len: u64, fua: bool) -> Result<(), DeviceError>;
    /// Zeroes a range; `no_hole` asks for allocated zeroes.
    fn write_zeroes(
        &self,
        offset: u64,
        len: u64,
        no_hole: bool,
        fua: bool,
    ) -> Result<(), DeviceError>;
    /// Allocation of a range, as runs from `offset`; may cover less than asked, not nothing.
    fn extents(&self, offset: u64, len: u64) -> Result<Vec<Extent>, DeviceError>;
}

/// Who a client is, as far as its connection tells.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Peer {
    /// A process of this host on a Unix socket: its process id, when the kernel told it
    /// (`SO_PEERCRED`, taken when it connected).
    Unix {
        /// The connecting process's id.
        pid: Option<u32>,
    },
    /// NBD over TCP (with or without TLS, as the server is configured).
    Tcp {
        /// The client's address.
        addr: String,
    },
    /// Anything else: a test's stream, or another protocol served through the same
    /// [`Exports`] (the store's QUIC volume export).
    Other {
        /// What it is, for logs.
        name: String,
        /// The client is another server relaying its own client's requests (a store that
        /// holds no copy of a volume forwarding to one that does): it is served from what
        /// this server holds and never relayed on, so a stale idea of where a volume is
        /// cannot send a request round in a loop.
        relayed: bool,
    },
}

impl std::fmt::Display for Peer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Peer::Unix { pid: Some(pid) } => write!(f, "unix (pid {pid})"),
            Peer::Unix { pid: None } => f.write_str("unix"),
            Peer::Tcp { addr } => f.write_str(addr),
            Peer::Other {
                name,
                relayed: false,
            } => f.write_str(name),
            Peer::Other {
                name,
                relayed: true,
            } => write!(f, "{name} (relaying its own client)"),
        }
    }
}

/// A listed export: the `NBD_REP_SERVER` payload, shared with the codec.
pub use crate::proto::ExportEntry;

/// The set of exports a server offers.
pub trait Exports: Send + Sync + 'static {
    /// The device type.
    type Device: Device;
    /// Every export, for `NBD_OPT_LIST`.
    fn list(&self) -> Vec<ExportEntry>;
    /// Opens an export by name; `None` when there is no such export.
    fn open(&self, name: &str) -> Result<Option<Arc<Self::Device>>, DeviceError>;
    /// Opens an export for a client connected from `peer`, for exports whose rules
    /// depend on who the client is (the store lets only a running VM's own VMM write
    /// its disk). By default the same as [`Exports::open`].
    fn open_for(&self, name: &str, peer: &Peer) -> Result<Option<Arc<Self::Device>>, DeviceError> {
        let _ = peer;
        self.open(name)
    }
    /// The description of an export, for `NBD_INFO_DESCRIPTION`.
    fn describe(&self, name: &str) -> Option<String> {
        self.list()
            .into_iter()
            .find(|e| e.name == name)
            .map(|e| e.description)
    }
}
