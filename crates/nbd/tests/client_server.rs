//! Our client and our server, talking through the one codec: what the client writes it
//! reads back, refusals arrive as typed errors, and structured replies decode with the
//! same functions the server encoded them with.
// Helpers outside #[test] functions unwrap too: a failure there is a failed test.
#![allow(clippy::unwrap_used)]

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};

use tessera_nbd::proto::{self, *};
use tessera_nbd::{
    serve_unix, Client, ClientError, Device, DeviceError, ExportEntry, Exports, Extent,
    ServerConfig,
};

const SIZE: usize = 1 << 20;

/// A device in memory; `read_only` for the snapshot export.
struct Mem {
    data: Mutex<Vec<u8>>,
    read_only: bool,
}

impl Mem {
    fn bytes(&self) -> std::sync::MutexGuard<'_, Vec<u8>> {
        self.data.lock().unwrap()
    }
    fn range(offset: u64, len: u64) -> std::ops::Range<usize> {
        offset as usize..(offset + len) as usize
    }
}

impl Device for Mem {
    fn size(&self) -> u64 {
        SIZE as u64
    }
    fn read_only(&self) -> bool {
        self.read_only
    }
    fn read(&self, offset: u64, buf: &mut [u8]) -> Result<(), DeviceError> {
        buf.copy_from_slice(&self.bytes()[Mem::range(offset, buf.len() as u64)]);
        Ok(())
    }
    fn write(&self, offset: u64, data: &[u8], _fua: bool) -> Result<(), DeviceError> {
        self.bytes()[Mem::range(offset, data.len() as u64)].copy_from_slice(data);
        Ok(())
    }
    fn flush(&self) -> Result<(), DeviceError> {
        Ok(())
    }
    fn trim(&self, offset: u64, len: u64, _fua: bool) -> Result<(), DeviceError> {
        self.bytes()[Mem::range(offset, len)].fill(0);
        Ok(())
    }
    fn write_zeroes(&self, offset: u64, len: u64, _: bool, _: bool) -> Result<(), DeviceError> {
        self.trim(offset, len, false)
    }
    fn extents(&self, _offset: u64, len: u64) -> Result<Vec<Extent>, DeviceError> {
        Ok(vec![Extent {
            length: len,
            flags: STATE_HOLE | STATE_ZERO,
        }])
    }
}

struct TwoExports {
    vol: Arc<Mem>,
    snap: Arc<Mem>,
}

impl Exports for TwoExports {
    type Device = Mem;
    fn list(&self) -> Vec<ExportEntry> {
        ["vol", "vol@snap"]
            .map(|name| ExportEntry {
                name: name.into(),
                description: format!("{name} in memory"),
            })
            .into()
    }
    fn open(&self, name: &str) -> Result<Option<Arc<Mem>>, DeviceError> {
        Ok(match name {
            "vol" => Some(self.vol.clone()),
            "vol@snap" => Some(self.snap.clone()),
            _ => None,
        })
    }
}

/// A server's socket file, removed when the test ends.
struct Socket(PathBuf);

impl Drop for Socket {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// Starts a server on a fresh Unix socket, on its own runtime thread.
fn serve() -> Socket {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let path = std::env::temp_dir().join(format!(
        "tessera-nbd-test-{}-{}.sock",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    ));
    let mem = |read_only| {
        Arc::new(Mem {
            data: Mutex::new(vec![0; SIZE]),
            read_only,
        })
    };
    let exports = Arc::new(TwoExports {
        vol: mem(false),
        snap: mem(true),
    });
    let (tx, rx) = std::sync::mpsc::channel();
    let at = path.clone();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            // Bound inside the runtime: a tokio listener needs its reactor.
            let listener = tessera_nbd::bind_unix(&at).unwrap();
            tx.send(()).unwrap();
            serve_unix(listener, exports, ServerConfig::default()).await
        })
    });
    rx.recv().unwrap();
    Socket(path)
}

#[test]
fn the_client_reads_back_what_it_wrote() {
    let path = serve();
    let mut c = Client::connect_unix(&path.0, "vol").unwrap();
    assert_eq!(c.size(), SIZE as u64);
    assert_ne!(c.flags() & TF_HAS_FLAGS, 0);
    assert_eq!(c.flags() & TF_READ_ONLY, 0);
    c.write(4096, &[7; 8192], true).unwrap();
    c.write(SIZE as u64 - 512, &[9; 512], false).unwrap();
    c.flush().unwrap();
    let mut buf = vec![0; 8192];
    c.read(4096, &mut buf).unwrap();
    assert_eq!(buf, vec![7; 8192]);
    c.trim(4096, 4096).unwrap();
    c.write_zeroes(8192, 1024, true).unwrap();
    c.read(4096, &mut buf).unwrap();
    assert_eq!(&buf[..5120], &[0; 5120][..]);
    assert_eq!(&buf[5120..], &[7; 3072][..]);
    c.read(SIZE as u64 - 512, &mut buf[..512]).unwrap();
    assert_eq!(&buf[..512], &[9; 512][..]);
    c.disconnect().unwrap();
}

#[test]
fn refusals_reach_the_client_as_typed_errors() {
    let path = serve();
    match Client::connect_unix(&path.0, "nope") {
        Err(ClientError::Refused {
            option,
            reply,
            message,
        }) => {
            assert_eq!((option, reply), (OPT_GO, REP_ERR_UNKNOWN));
            assert!(message.contains("nope"), "{message}");
        }
        other => panic!("unknown export was not refused: {:?}", other.err()),
    }
    let mut snap = Client::connect_unix(&path.0, "vol@snap").unwrap();
    assert_ne!(snap.flags() & TF_READ_ONLY, 0);
    let err = snap.write(0, &[1; 512], false).unwrap_err();
    assert!(
        matches!(err, ClientError::Errno(e) if e == Errno::Perm as u32),
        "{err}"
    );
    let err = snap.read(SIZE as u64 - 1, &mut [0; 2]).unwrap_err();
    assert!(
        matches!(err, ClientError::Errno(e) if e == Errno::Inval as u32),
        "{err}"
    );
    let mut buf = [1u8; 512];
    snap.read(0, &mut buf).unwrap();
    assert_eq!(buf, [0; 512], "the connection survives refused requests");
}

/// A raw client built from the codec alone, for what our client does not negotiate.
struct Raw(UnixStream);

impl Raw {
    fn option(&mut self, option: u32, payload: &[u8]) -> Vec<(u32, Vec<u8>)> {
        self.0
            .write_all(&OptionHeader::with_payload(option, payload))
            .unwrap();
        let mut replies = Vec::new();
        loop {
            let mut h = [0u8; OPTION_REPLY_LEN];
            self.0.read_exact(&mut h).unwrap();
            let h = OptionReplyHeader::decode(&h).unwrap();
            assert_eq!(h.option, option);
            let mut body = vec![0; h.length as usize];
            self.0.read_exact(&mut body).unwrap();
            let last = h.kind == REP_ACK || h.is_error();
            replies.push((h.kind, body));
            if last {
                return replies;
            }
        }
    }

    fn chunk(&mut self, cookie: u64) -> (ChunkHeader, Vec<u8>) {
        let mut h = [0u8; CHUNK_HEADER_LEN];
        self.0.read_exact(&mut h).unwrap();
        let h = ChunkHeader::decode(&h).unwrap();
        assert_eq!(h.cookie, cookie);
        assert!(h.is_done());
        let mut body = vec![0; h.length as usize];
        self.0.read_exact(&mut body).unwrap();
        (h, body)
    }
}

#[test]
fn structured_replies_decode_with_the_servers_codec() {
    let path = serve();
    let mut r = Raw(UnixStream::connect(&path.0).unwrap());
    let mut g = [0u8; GREETING_LEN];
    r.0.read_exact(&mut g).unwrap();
    assert_ne!(Greeting::decode(&g).unwrap().flags & FLAG_FIXED_NEWSTYLE, 0);
    r.0.write_all(&CLIENT_FIXED_NEWSTYLE.to_be_bytes()).unwrap();

    let listed = r.option(OPT_LIST, &[]);
    let names: Vec<_> = listed
        .iter()
        .filter(|(kind, _)| *kind == REP_SERVER)
        .map(|(_, p)| ExportEntry::decode(p).unwrap().name)
        .collect();
    assert_eq!(names, ["vol", "vol@snap"]);
    assert_eq!(r.option(OPT_STRUCTURED_REPLY, &[])[0].0, REP_ACK);
    let meta = MetaRequest {
        export: "vol".into(),
        queries: vec![BASE_ALLOCATION.into()],
    };
    let set = r.option(OPT_SET_META_CONTEXT, &meta.encode());
    let context = MetaContext::decode(&set[0].1).unwrap();
    assert_eq!(context.name, BASE_ALLOCATION);
    let go = GoRequest {
        name: "vol".into(),
        info: vec![INFO_NAME, INFO_DESCRIPTION],
    };
    let infos: Vec<_> = r
        .option(OPT_GO, &go.encode())
        .iter()
        .filter(|(kind, _)| *kind == REP_INFO)
        .map(|(_, p)| Info::decode(p).unwrap())
        .collect();
    assert!(infos.contains(&Info::Name("vol".into())), "{infos:?}");
    assert!(infos.contains(&Info::Description("vol in memory".into())));
    assert!(infos
        .iter()
        .any(|i| matches!(i, Info::Export { size, .. } if *size == SIZE as u64)));

    let request = |kind, cookie, offset, length| Request {
        flags: 0,
        kind,
        cookie,
        offset,
        length,
    };
    r.0.write_all(&request(CMD_READ, 1, 512, 16).encode())
        .unwrap();
    let (h, body) = r.chunk(1);
    assert_eq!(h.kind, REPLY_TYPE_OFFSET_DATA);
    assert_eq!(decode_offset_data(&body).unwrap(), (512, &[0u8; 16][..]));

    r.0.write_all(&request(CMD_BLOCK_STATUS, 2, 0, 4096).encode())
        .unwrap();
    let (h, body) = r.chunk(2);
    assert_eq!(h.kind, REPLY_TYPE_BLOCK_STATUS);
    let status = BlockStatus::decode(&body).unwrap();
    assert_eq!(status.context, context.id);
    assert_eq!(
        status.extents,
        [BlockDescriptor {
            length: 4096,
            flags: STATE_HOLE | STATE_ZERO
        }]
    );

    r.0.write_all(&request(CMD_READ, 3, SIZE as u64, 1).encode())
        .unwrap();
    let (h, body) = r.chunk(3);
    assert_eq!(h.kind, proto::REPLY_TYPE_ERROR);
    let e = ErrorChunk::decode(&body).unwrap();
    assert_eq!(e.errno, Errno::Inval as u32);
    assert!(e.message.contains("Inval"), "{}", e.message);
}
