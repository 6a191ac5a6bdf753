//! The target's side: listen (TLS, client certificates of the cluster CA only), take the
//! one source that presents the token and a VM this VMM was started to hold, and fill
//! fresh guest memory and the state from its stream. The caller (`vm::run`) builds the
//! VM from that, says `Loaded`, and runs it only after `migration_go`.

use std::net::{SocketAddr, TcpListener};
use std::sync::Arc;
use std::time::{Duration, Instant};

use vm_memory::{Bytes, GuestAddress};

use super::tls::{self, ServerStream, TlsError, TlsFiles};
use super::wire::{self, DiskInfo, Hello, Message, WireError, PAGE_SIZE};
use super::{Direction, Phase, Shared, Status};
use crate::config::VmConfig;
use crate::control::Control;
use crate::memory;
use crate::snapshot::{self, Snapshot, SnapshotError};

/// How long an accepted connection may take to finish its handshake and `Hello`.
const HELLO_LIMIT: Duration = Duration::from_secs(10);
/// How long a read of the stream may block once the source was accepted.
const STREAM_LIMIT: Duration = Duration::from_secs(30);

/// What `--incoming` asks.
#[derive(Clone, Debug)]
pub struct Args {
    /// The VM to receive: memory, vCPUs, NICs and the disk (opened at `go`) must match
    /// the source's.
    pub cfg: VmConfig,
    /// Where to listen (port 0: any free port; the status says which).
    pub listen: SocketAddr,
    /// This node's TLS files.
    pub tls: TlsFiles,
    /// How long to wait for the source to connect.
    pub wait: Duration,
}

/// Why receiving failed.
#[derive(Debug, thiserror::Error)]
pub enum IncomingError {
    /// The listening socket.
    #[error("listening on {addr}: {error}")]
    Listen {
        /// Where.
        addr: SocketAddr,
        /// Why.
        error: std::io::Error,
    },
    /// TLS setup.
    #[error(transparent)]
    Tls(#[from] TlsError),
    /// The stream.
    #[error(transparent)]
    Wire(#[from] WireError),
    /// No source came.
    #[error("no source connected within {0:?}")]
    NoSource(Duration),
    /// The VMM was told to stop while it waited.
    #[error("stopped while waiting for the migration")]
    Stopped,
    /// The source's VM is not one this VMM can hold.
    #[error("the source's VM does not match this target: {0}")]
    Mismatch(String),
    /// The source broke the protocol.
    #[error("the source sent {0}")]
    Protocol(String),
    /// The state does not make a VM.
    #[error("the migrated state: {0}")]
    State(#[from] SnapshotError),
    /// A token could not be made.
    #[error("making the token: {0}")]
    Token(std::io::Error),
}

/// A target listening for its source.
pub struct Listening {
    listener: TcpListener,
    config: Arc<rustls::ServerConfig>,
    token: String,
}

/// What a source sent: the state to build the VM from (memory is already in place).
pub struct Received {
    /// The VM's state.
    pub snap: Snapshot,
    /// The console's recent output (absolute start offset, bytes).
    pub scrollback: Option<(u64, Vec<u8>)>,
    /// The disk as the guest knows it.
    pub disk: Option<DiskInfo>,
    /// The stream, for `Loaded` and `Resumed`.
    pub stream: ServerStream,
}

/// Binds the listening socket and makes the token; the status shows both.
pub fn listen(args: &Args, shared: &Shared) -> Result<Listening, IncomingError> {
    let config = args.tls.server()?;
    let listener = TcpListener::bind(args.listen).map_err(|error| IncomingError::Listen {
        addr: args.listen,
        error,
    })?;
    let addr = listener
        .local_addr()
        .map_err(|error| IncomingError::Listen {
            addr: args.listen,
            error,
        })?;
    let token = super::new_token().map_err(IncomingError::Token)?;
    shared.update(|s| {
        *s = Status {
            direction: Some(Direction::In),
            phase: Phase::Listening,
            memory_bytes: args.cfg.memory_mib << 20,
            listen: Some(addr.to_string()),
            token: Some(token.clone()),
            ..Status::default()
        }
    });
    tracing::info!(%addr, "waiting for an incoming migration");
    Ok(Listening {
        listener,
        config,
        token,
    })
}

/// Why the source's VM cannot come here, if it cannot.
pub fn mismatch(h: &Hello, cfg: &VmConfig, layout: &[(u64, u64)]) -> Option<String> {
    if h.spec.memory_mib != cfg.memory_mib || h.memory != layout {
        return Some(format!(
            "memory: the source has {} MiB, this target {} MiB",
            h.spec.memory_mib, cfg.memory_mib
        ));
    }
    if h.spec.vcpus != cfg.vcpus {
        return Some(format!(
            "vCPUs: the source has {}, this target {}",
            h.spec.vcpus, cfg.vcpus
        ));
    }
    if h.spec.nics.len() != cfg.nics.len() {
        return Some(format!(
            "NICs: the source has {}, this target {}",
            h.spec.nics.len(),
            cfg.nics.len()
        ));
    }
    if h.disk.is_some() != cfg.disk.is_some() {
        return Some(if cfg.disk.is_some() {
            "disk: the source's VM has none, this target was given one".into()
        } else {
            "disk: the source's VM has one, this target was given none".into()
        });
    }
    None
}

/// Waits for the source (at most `args.wait`), checks it, and receives guest memory into
/// `mem` and the state. Connections that fail the TLS handshake (no certificate of the
/// cluster CA) or present the wrong token are refused, and the target keeps listening.
pub fn receive(
    l: Listening,
    args: &Args,
    mem: &tessera_virtio::GuestMem,
    control: &Control,
    shared: &Shared,
) -> Result<Received, IncomingError> {
    let layout = memory::layout(mem);
    let deadline = Instant::now() + args.wait;
    l.listener
        .set_nonblocking(true)
        .map_err(|error| IncomingError::Listen {
            addr: args.listen,
            error,
        })?;
    let (mut s, disk) = loop {
        if control.stop_requested().is_some() || shared.cancelled() {
            return Err(IncomingError::Stopped);
        }
        if Instant::now() >= deadline {
            return Err(IncomingError::NoSource(args.wait));
        }
        let sock = match l.listener.accept() {
            Ok((sock, _)) => sock,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                std::thread::sleep(Duration::from_millis(20));
                continue;
            }
            Err(error) => {
                return Err(IncomingError::Listen {
                    addr: args.listen,
                    error,
                })
            }
        };
        let peer = sock
            .peer_addr()
            .map_or_else(|_| "?".into(), |a| a.to_string());
        if let Err(e) = sock.set_nonblocking(false) {
            tracing::warn!(%peer, error = %e, "refused a migration connection");
            continue;
        }
        let mut s = match tls::accept(l.config.clone(), sock, HELLO_LIMIT) {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(%peer, error = %e, "refused a migration connection");
                continue;
            }
        };
        let hello = match wire::read_preamble(&mut s).and_then(|()| wire::read(&mut s)) {
            Ok(Message::Hello(h)) => h,
            Ok(_) => {
                tracing::warn!(%peer, "refused a migration connection: it did not start with Hello");
                continue;
            }
            Err(e) => {
                tracing::warn!(%peer, error = %e, "refused a migration connection");
                continue;
            }
        };
        if !super::same_token(&hello.token, &l.token) {
            tracing::warn!(%peer, "refused a migration connection: wrong token");
            let _ = wire::write(&mut s, &Message::Refuse("wrong token".into()));
            continue;
        }
        if let Some(why) = mismatch(&hello, &args.cfg, &layout) {
            let _ = wire::write(&mut s, &Message::Refuse(why.clone()));
            return Err(IncomingError::Mismatch(why));
        }
        wire::write(&mut s, &Message::Accept)?;
        tracing::info!(%peer, "incoming migration accepted");
        break (s, hello.disk.clone());
    };
    // One source: nobody else may connect now.
    drop(l.listener);
    shared.set_socket(s.sock.try_clone().ok());
    s.sock
        .set_read_timeout(Some(STREAM_LIMIT))
        .map_err(WireError::Io)?;
    s.sock
        .set_write_timeout(Some(STREAM_LIMIT))
        .map_err(WireError::Io)?;
    shared.update(|st| st.phase = Phase::Receiving);
    match fill(&mut s, mem, shared) {
        Ok((snap, scrollback)) => {
            if snap.spec.vcpus != args.cfg.vcpus
                || snap.nics.len() != args.cfg.nics.len()
                || snap.memory != layout
            {
                let why = "the state does not match the Hello".to_string();
                let _ = wire::write(&mut s, &Message::Refuse(why.clone()));
                return Err(IncomingError::Protocol(why));
            }
            Ok(Received {
                snap,
                scrollback,
                disk,
                stream: s,
            })
        }
        Err(e) => {
            let _ = wire::write(&mut s, &Message::Refuse(e.to_string()));
            Err(e)
        }
    }
}

type Filled = (Snapshot, Option<(u64, Vec<u8>)>);

/// Reads pages into `mem` until the state comes.
fn fill(
    s: &mut ServerStream,
    mem: &tessera_virtio::GuestMem,
    shared: &Shared,
) -> Result<Filled, IncomingError> {
    let zero = vec![0u8; PAGE_SIZE];
    let mut scrollback = None;
    let outside =
        |gpa: u64| IncomingError::Protocol(format!("pages at {gpa:#x}, outside guest memory"));
    loop {
        match wire::read(s)? {
            Message::Pages { gpa, data } => {
                mem.write_slice(&data, GuestAddress(gpa))
                    .map_err(|_| outside(gpa))?;
                let n = data.len() as u64;
                shared.update(|st| {
                    st.bytes += n;
                    st.pages += n / PAGE_SIZE as u64;
                });
            }
            Message::Zeroes { gpa, pages } => {
                for i in 0..u64::from(pages) {
                    let at = gpa
                        .checked_add(i * PAGE_SIZE as u64)
                        .ok_or_else(|| outside(gpa))?;
                    mem.write_slice(&zero, GuestAddress(at))
                        .map_err(|_| outside(gpa))?;
                }
                shared.update(|st| st.zero_pages += u64::from(pages));
            }
            Message::Scrollback { start, data } => scrollback = Some((start, data)),
            Message::State(doc) => return Ok((snapshot::parse_state(&doc)?, scrollback)),
            Message::Refuse(why) => return Err(IncomingError::Protocol(format!("Refuse: {why}"))),
            _ => return Err(IncomingError::Protocol("a message out of turn".into())),
        }
    }
}

/// Tells the source the VM is loaded here.
pub fn loaded(s: &mut ServerStream) -> Result<(), WireError> {
    wire::write(s, &Message::Loaded)?;
    std::io::Write::flush(s)?;
    Ok(())
}

/// Tells the source the guest runs here (best effort: the source may be gone, and the
/// guest runs here regardless).
pub fn resumed(mut s: ServerStream) {
    let res =
        wire::write(&mut s, &Message::Resumed).and_then(|()| Ok(std::io::Write::flush(&mut s)?));
    if let Err(e) = res {
        tracing::warn!(error = %e, "could not tell the source the guest runs here");
    }
    s.conn.send_close_notify();
    let _ = std::io::Write::flush(&mut s);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_source_vm_that_does_not_fit_the_target_is_named() {
        let cfg: VmConfig = serde_json::from_value(
            serde_json::json!({"kernel": "k", "memory_mib": 64, "vcpus": 1, "disk": "d"}),
        )
        .unwrap();
        let layout = vec![(0u64, 64u64 << 20)];
        let hello = |mib: u64, vcpus: u8, disk: bool| Hello {
            token: "t".into(),
            spec: serde_json::from_value(
                serde_json::json!({"kernel": "k", "memory_mib": mib, "vcpus": vcpus}),
            )
            .unwrap(),
            memory: vec![(0, mib << 20)],
            disk: disk.then_some(DiskInfo {
                size: 1 << 20,
                read_only: false,
            }),
        };
        assert_eq!(mismatch(&hello(64, 1, true), &cfg, &layout), None);
        assert!(mismatch(&hello(128, 1, true), &cfg, &layout)
            .unwrap()
            .contains("128 MiB"));
        assert!(mismatch(&hello(64, 2, true), &cfg, &layout)
            .unwrap()
            .starts_with("vCPUs"));
        assert!(mismatch(&hello(64, 1, false), &cfg, &layout)
            .unwrap()
            .starts_with("disk"));
    }
}
