//! One request of the volume export, on its own stream: decode and check the header,
//! run it on the device (off the async workers when it may block on the disk), answer.

use std::sync::Arc;

use tessera_nbd::proto::{Errno, STATE_HOLE, STATE_ZERO};
use tessera_nbd::{Device, DeviceError};
use tessera_volume_client::proto::{
    self, ErrorCode, Extent, Kind, Request, EXTENT_HOLE, EXTENT_ZERO, MAX_EXTENTS, MAX_MESSAGE,
    REQUEST_LEN,
};

/// The stream error code a refused request's unread payload is stopped with.
const STOPPED: u32 = 1;

/// A request's failure: the code and the message sent back.
type Failure = (ErrorCode, String);

/// The export's code for a device's errno.
pub fn code_of(e: Errno) -> ErrorCode {
    match e {
        Errno::Perm => ErrorCode::NotPermitted,
        Errno::Inval => ErrorCode::Invalid,
        Errno::NoSpc => ErrorCode::NoSpace,
        Errno::Overflow => ErrorCode::TooLarge,
        Errno::NotSup => ErrorCode::NotSupported,
        Errno::Shutdown => ErrorCode::Shutdown,
        Errno::Io | Errno::NoMem => ErrorCode::Io,
    }
}

fn failed(e: DeviceError) -> Failure {
    (code_of(e.errno), e.message)
}

/// Sends a reply (`code` `None`: success) and ends the stream.
pub async fn reply(
    send: &mut quinn::SendStream,
    code: Option<ErrorCode>,
    payload: &[u8],
) -> Result<(), String> {
    let header = proto::encode_reply(code, payload.len() as u64);
    send.write_all(&header).await.map_err(|e| e.to_string())?;
    send.write_all(payload).await.map_err(|e| e.to_string())?;
    send.finish().map_err(|e| e.to_string())
}

/// Answers with an error, leaving whatever payload the client sent unread (the stream is
/// stopped, so the client's send ends instead of waiting for window).
pub async fn refuse(
    mut send: quinn::SendStream,
    recv: &mut quinn::RecvStream,
    code: ErrorCode,
    message: &str,
) -> Result<(), String> {
    tracing::info!(?code, message, "volume export: request refused");
    let _ = recv.stop(STOPPED.into());
    let mut m = message.as_bytes();
    if m.len() as u64 > MAX_MESSAGE {
        m = &m[..MAX_MESSAGE as usize];
    }
    reply(&mut send, Some(code), m).await
}

/// Reads an `Open`'s volume name (`len` checked by the codec already).
pub async fn read_name(recv: &mut quinn::RecvStream, len: u64) -> Result<String, String> {
    let mut b = vec![0u8; len as usize];
    recv.read_exact(&mut b).await.map_err(|e| e.to_string())?;
    String::from_utf8(b).map_err(|_| "the volume name is not UTF-8".to_string())
}

/// Serves the request on one stream.
pub async fn serve<D: Device>(
    mut send: quinn::SendStream,
    mut recv: quinn::RecvStream,
    device: Arc<D>,
) -> Result<(), String> {
    let mut header = [0u8; REQUEST_LEN];
    recv.read_exact(&mut header)
        .await
        .map_err(|e| e.to_string())?;
    let outcome = match proto::decode_request(&header) {
        Err(bad) => Err((bad.code(), bad.to_string())),
        Ok(r) => run(r, &mut recv, device).await,
    };
    match outcome {
        Ok(payload) => reply(&mut send, None, &payload).await,
        Err((code, message)) => refuse(send, &mut recv, code, &message).await,
    }
}

/// Checks that `r`'s range lies inside the device.
fn in_range(r: &Request, size: u64) -> Result<(), Failure> {
    match r.offset.checked_add(r.length) {
        Some(end) if end <= size => Ok(()),
        _ => Err((
            ErrorCode::Invalid,
            format!(
                "{} bytes at offset {} go past the end of the volume ({size} bytes)",
                r.length, r.offset
            ),
        )),
    }
}

fn writable<D: Device>(device: &D) -> Result<(), Failure> {
    if device.read_only() {
        return Err((
            ErrorCode::NotPermitted,
            "this export is read-only (a snapshot)".into(),
        ));
    }
    Ok(())
}

/// Runs `f` on the device off the async workers.
async fn blocking<D: Device, T: Send + 'static>(
    device: &Arc<D>,
    f: impl FnOnce(&D) -> Result<T, DeviceError> + Send + 'static,
) -> Result<T, Failure> {
    let d = device.clone();
    tokio::task::spawn_blocking(move || f(&d))
        .await
        .map_err(|e| (ErrorCode::Io, format!("the request failed: {e}")))?
        .map_err(failed)
}

async fn run<D: Device>(
    r: Request,
    recv: &mut quinn::RecvStream,
    device: Arc<D>,
) -> Result<Vec<u8>, Failure> {
    let size = device.size();
    match r.kind {
        Kind::Open => Err((
            ErrorCode::Invalid,
            "this connection has a volume open already".into(),
        )),
        // A forwarded export's reads complete on another node's store: awaited, no
        // thread held meanwhile.
        Kind::Read if device.remote_reads() => {
            in_range(&r, size)?;
            device
                .read_remote(r.offset, r.length as usize)
                .await
                .map_err(failed)
        }
        Kind::Read => {
            in_range(&r, size)?;
            blocking(&device, move |d| {
                let mut buf = vec![0u8; r.length as usize];
                d.read(r.offset, &mut buf).map(|()| buf)
            })
            .await
        }
        Kind::Write => {
            in_range(&r, size)?;
            writable(&*device)?;
            let mut data = vec![0u8; r.length as usize];
            recv.read_exact(&mut data)
                .await
                .map_err(|e| (ErrorCode::Invalid, format!("reading the write's data: {e}")))?;
            // The same route as an NBD write: a replicated primary's write completes
            // after its replicas answer, without holding a thread meanwhile.
            if device.remote_writes() {
                device
                    .write_remote(r.offset, data, r.fua)
                    .await
                    .map_err(failed)?;
            } else {
                blocking(&device, move |d| d.write_owned(r.offset, data, r.fua)).await?;
            }
            Ok(Vec::new())
        }
        Kind::Flush => {
            blocking(&device, |d| d.flush()).await?;
            Ok(Vec::new())
        }
        Kind::Trim => {
            in_range(&r, size)?;
            writable(&*device)?;
            blocking(&device, move |d| d.trim(r.offset, r.length, r.fua)).await?;
            Ok(Vec::new())
        }
        Kind::Digest => {
            in_range(&r, size)?;
            blocking(&device, move |d| {
                let mut buf = vec![0u8; r.length as usize];
                d.read(r.offset, &mut buf)
                    .map(|()| blake3::hash(&buf).as_bytes().to_vec())
            })
            .await
        }
        Kind::BlockStatus => {
            in_range(&r, size)?;
            if r.length == 0 {
                return Err((ErrorCode::Invalid, "a block status of no bytes".into()));
            }
            let runs = if device.remote_reads() {
                device
                    .extents_remote(r.offset, r.length)
                    .await
                    .map_err(failed)?
            } else {
                blocking(&device, move |d| d.extents(r.offset, r.length)).await?
            };
            let extents: Vec<Extent> = runs
                .iter()
                .filter(|e| e.length > 0)
                .take(MAX_EXTENTS)
                .map(|e| Extent {
                    length: e.length,
                    flags: if e.flags & STATE_HOLE != 0 {
                        EXTENT_HOLE
                    } else {
                        0
                    } | if e.flags & STATE_ZERO != 0 {
                        EXTENT_ZERO
                    } else {
                        0
                    },
                })
                .collect();
            if extents.is_empty() {
                return Err((ErrorCode::Io, "the store reported no extent".into()));
            }
            Ok(proto::encode_extents(&extents))
        }
    }
}
