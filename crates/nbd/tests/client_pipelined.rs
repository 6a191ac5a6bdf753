//! The pipelined client against servers that misbehave on purpose (one that answers only
//! once eight requests are outstanding, in reverse order; one that never answers) and
//! against our own server restarted under it and requiring TLS.
// Helpers outside #[test] functions unwrap too: a failure there is a failed test.
#![allow(clippy::unwrap_used)]

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tessera_nbd::client_pipelined::{Endpoint, Target, Timeouts, Tls};
use tessera_nbd::proto::{
    self, Errno, Info, OptionHeader, OptionReplyHeader, Request, SimpleReply, OPTION_HEADER_LEN,
    REQUEST_LEN,
};
use tessera_nbd::{
    bind_unix, serve_tcp, serve_unix, ClientError, Device, DeviceError, ExportEntry, Exports,
    Extent, PipelinedClient, ServerConfig, TlsRequired,
};
use tessera_pki::{node_key_and_request, ClusterCa, NodeCredentials};

const SIZE: usize = 1 << 20;

/// Does a fixed-newstyle handshake as a server offering one export of `SIZE` bytes.
fn handshake(s: &mut TcpStream) {
    let mut g = Vec::new();
    g.extend_from_slice(&proto::NBD_MAGIC.to_be_bytes());
    g.extend_from_slice(&proto::IHAVEOPT.to_be_bytes());
    g.extend_from_slice(&(proto::FLAG_FIXED_NEWSTYLE | proto::FLAG_NO_ZEROES).to_be_bytes());
    s.write_all(&g).unwrap();
    let mut cflags = [0u8; 4];
    s.read_exact(&mut cflags).unwrap();
    let mut h = [0u8; OPTION_HEADER_LEN];
    s.read_exact(&mut h).unwrap();
    let opt = OptionHeader::decode(&h).unwrap();
    assert_eq!(opt.option, proto::OPT_GO);
    let mut payload = vec![0u8; opt.length as usize];
    s.read_exact(&mut payload).unwrap();
    let info = Info::Export {
        size: SIZE as u64,
        flags: 1,
    }
    .encode();
    let rep = |kind, len| OptionReplyHeader {
        option: proto::OPT_GO,
        kind,
        length: len,
    };
    s.write_all(&rep(proto::REP_INFO, info.len() as u32).encode())
        .unwrap();
    s.write_all(&info).unwrap();
    s.write_all(&rep(proto::REP_ACK, 0).encode()).unwrap();
}

fn read_request(s: &mut TcpStream) -> Option<Request> {
    let mut h = [0u8; REQUEST_LEN];
    s.read_exact(&mut h).ok()?;
    let r = Request::decode(&h).unwrap();
    if r.kind == proto::CMD_WRITE {
        let mut p = vec![0u8; r.length as usize];
        s.read_exact(&mut p).unwrap();
    }
    Some(r)
}

fn client(addr: String, request: Duration) -> PipelinedClient {
    PipelinedClient::connect(
        Target {
            endpoint: Endpoint::Tcp(addr),
            export: "disk".into(),
            tls: None,
        },
        Timeouts {
            request,
            connect: Duration::from_secs(5),
        },
    )
    .unwrap()
}

#[test]
fn eight_requests_are_in_flight_at_once_and_replies_match_by_cookie() {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap().to_string();
    let server = std::thread::spawn(move || {
        let (mut s, _) = l.accept().unwrap();
        handshake(&mut s);
        // Nothing is answered until eight requests wait: a one-at-a-time client times out.
        let reqs: Vec<Request> = (0..8).map(|_| read_request(&mut s).unwrap()).collect();
        for r in reqs.iter().rev() {
            s.write_all(
                &SimpleReply {
                    cookie: r.cookie,
                    error: 0,
                }
                .encode(),
            )
            .unwrap();
            if r.kind == proto::CMD_READ {
                // Each read returns its own offset's low byte, so a mix-up shows.
                s.write_all(&vec![(r.offset >> 12) as u8; r.length as usize])
                    .unwrap();
            }
        }
        reqs.len()
    });
    let c = Arc::new(client(addr, Duration::from_secs(10)));
    let workers: Vec<_> = (0..8u64)
        .map(|i| {
            let c = c.clone();
            std::thread::spawn(move || {
                if i % 2 == 0 {
                    let data = c.read(i << 12, 4096).unwrap();
                    assert_eq!(data, vec![i as u8; 4096], "reply of request {i} mixed up");
                } else {
                    c.write(i << 12, vec![1; 512], false).unwrap();
                }
            })
        })
        .collect();
    for w in workers {
        w.join().unwrap();
    }
    assert_eq!(server.join().unwrap(), 8);
}

#[test]
fn a_server_that_never_answers_fails_the_request_after_the_timeout() {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap().to_string();
    let (seen_tx, seen) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        // Accepts every (re)connection, reads requests, answers none.
        for s in l.incoming() {
            let mut s = s.unwrap();
            let seen_tx = seen_tx.clone();
            std::thread::spawn(move || {
                handshake(&mut s);
                while let Some(r) = read_request(&mut s) {
                    let _ = seen_tx.send(r.cookie);
                }
            });
        }
    });
    let c = client(addr, Duration::from_millis(800));
    let t = Instant::now();
    let r = c.read(0, 512);
    let took = t.elapsed();
    assert!(matches!(r, Err(ClientError::Timeout)), "{r:?}");
    assert!(
        took >= Duration::from_millis(700) && took < Duration::from_secs(5),
        "timed out after {took:?}"
    );
    seen.recv_timeout(Duration::from_secs(1))
        .expect("the server never saw the request");
    // The next request gets its own deadline (on a new connection), and fails the same way.
    let t = Instant::now();
    assert!(matches!(c.flush(), Err(ClientError::Timeout)));
    assert!(t.elapsed() < Duration::from_secs(5));
}

/// A disk in memory that outlives the servers serving it.
struct Mem(Mutex<Vec<u8>>);

impl Mem {
    fn range(&self, offset: u64, len: usize) -> Result<std::ops::Range<usize>, DeviceError> {
        let start = offset as usize;
        match start.checked_add(len) {
            Some(end) if end <= SIZE => Ok(start..end),
            _ => Err(DeviceError::new(Errno::Inval, "out of range")),
        }
    }
}

impl Device for Mem {
    fn size(&self) -> u64 {
        SIZE as u64
    }
    fn read_only(&self) -> bool {
        false
    }
    fn read(&self, offset: u64, buf: &mut [u8]) -> Result<(), DeviceError> {
        let r = self.range(offset, buf.len())?;
        buf.copy_from_slice(&self.0.lock().unwrap()[r]);
        Ok(())
    }
    fn write(&self, offset: u64, data: &[u8], _: bool) -> Result<(), DeviceError> {
        let r = self.range(offset, data.len())?;
        self.0.lock().unwrap()[r].copy_from_slice(data);
        Ok(())
    }
    fn flush(&self) -> Result<(), DeviceError> {
        Ok(())
    }
    fn trim(&self, offset: u64, len: u64, _: bool) -> Result<(), DeviceError> {
        self.write_zeroes(offset, len, false, false)
    }
    fn write_zeroes(&self, offset: u64, len: u64, _: bool, _: bool) -> Result<(), DeviceError> {
        let r = self.range(offset, len as usize)?;
        self.0.lock().unwrap()[r].fill(0);
        Ok(())
    }
    fn extents(&self, _: u64, len: u64) -> Result<Vec<Extent>, DeviceError> {
        Ok(vec![Extent {
            length: len,
            flags: 0,
        }])
    }
}

struct One(Arc<Mem>);

impl Exports for One {
    type Device = Mem;
    fn list(&self) -> Vec<ExportEntry> {
        vec![ExportEntry {
            name: "disk".into(),
            description: String::new(),
        }]
    }
    fn open(&self, name: &str) -> Result<Option<Arc<Mem>>, DeviceError> {
        Ok((name == "disk").then(|| self.0.clone()))
    }
}

/// Our server on a Unix socket, on its own runtime: dropping it closes every connection.
fn serve_on(path: &Path, mem: &Arc<Mem>) -> tokio::runtime::Runtime {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let listener = rt.block_on(async { bind_unix(path) }).unwrap();
    rt.spawn(serve_unix(
        listener,
        Arc::new(One(mem.clone())),
        ServerConfig::default(),
    ));
    rt
}

#[test]
fn a_server_restart_pauses_requests_which_are_resent_after_reconnecting() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("nbd.sock");
    let mem = Arc::new(Mem(Mutex::new(vec![0; SIZE])));
    let rt = serve_on(&sock, &mem);
    let c = Arc::new(
        PipelinedClient::connect(
            Target {
                endpoint: Endpoint::Unix(sock.clone()),
                export: "disk".into(),
                tls: None,
            },
            Timeouts {
                request: Duration::from_secs(20),
                connect: Duration::from_secs(2),
            },
        )
        .unwrap(),
    );
    c.write(0, vec![7; 4096], false).unwrap();
    rt.shutdown_timeout(Duration::from_secs(1));
    // The server is gone; these wait instead of failing.
    let writers: Vec<_> = (1..5u64)
        .map(|i| {
            let c = c.clone();
            std::thread::spawn(move || c.write(i * 4096, vec![i as u8; 4096], false))
        })
        .collect();
    std::thread::sleep(Duration::from_millis(700));
    assert!(
        writers.iter().all(|w| !w.is_finished()),
        "a request finished while no server was there"
    );
    let _rt = serve_on(&sock, &mem);
    for w in writers {
        w.join().unwrap().unwrap();
    }
    assert_eq!(c.read(0, 4096).unwrap(), vec![7; 4096]);
    for i in 1..5u64 {
        assert_eq!(c.read(i * 4096, 4096).unwrap(), vec![i as u8; 4096]);
    }
    assert_eq!(mem.0.lock().unwrap()[4 * 4096], 4);
    // The first write was acknowledged, not flushed, when the server went away: the next
    // flush cannot vouch for it and fails; the one after covers what the server has.
    assert!(
        matches!(c.flush(), Err(ClientError::Errno(5))),
        "a flush after losing unflushed writes succeeded"
    );
    c.flush().unwrap();
    // Flushed writes survive a restart without a failed flush.
    c.write(0, vec![8; 512], false).unwrap();
    c.flush().unwrap();
    drop(_rt);
    let _rt = serve_on(&sock, &mem);
    c.flush().unwrap();
}

fn tls_server(ca: &ClusterCa, mem: &Arc<Mem>) -> (String, tokio::runtime::Runtime) {
    let (key_pem, csr) = node_key_and_request("node1").unwrap();
    let cert_pem = ca
        .issue_with_ips(&csr, "node1", &["127.0.0.1".parse().unwrap()])
        .unwrap();
    let tls =
        tessera_pki::server_config(&NodeCredentials { key_pem, cert_pem }, &ca.cert_pem).unwrap();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let listener = rt
        .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
        .unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let cfg = ServerConfig {
        tls: Some(TlsRequired::new(Arc::new(tls))),
        ..ServerConfig::default()
    };
    rt.spawn(serve_tcp(listener, Arc::new(One(mem.clone())), cfg));
    (addr, rt)
}

/// Writes libnbd's credential files: trusting `trust`, a certificate issued by `issuer`.
fn credentials(dir: &Path, trust: &ClusterCa, issuer: &ClusterCa) {
    let (key, csr) = node_key_and_request("vmm").unwrap();
    let cert = issuer.issue(&csr, "vmm").unwrap();
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(dir.join("ca-cert.pem"), &trust.cert_pem).unwrap();
    std::fs::write(dir.join("client-cert.pem"), cert).unwrap();
    std::fs::write(dir.join("client-key.pem"), key).unwrap();
}

fn tls_client(addr: &str, dir: &Path, server_name: &str) -> Result<PipelinedClient, ClientError> {
    let tls = Tls::from_pem_files(
        &dir.join("ca-cert.pem"),
        &dir.join("client-cert.pem"),
        &dir.join("client-key.pem"),
        server_name,
    )?;
    PipelinedClient::connect(
        Target {
            endpoint: Endpoint::Tcp(addr.to_string()),
            export: "disk".into(),
            tls: Some(tls),
        },
        Timeouts {
            request: Duration::from_secs(5),
            connect: Duration::from_secs(5),
        },
    )
}

#[test]
fn tls_with_a_cluster_certificate_is_served_and_anything_else_refused() {
    let ca = ClusterCa::mint("vmm-tls").unwrap();
    let other = ClusterCa::mint("someone-else").unwrap();
    let mem = Arc::new(Mem(Mutex::new(vec![0; SIZE])));
    let (addr, _rt) = tls_server(&ca, &mem);
    let dir = tempfile::tempdir().unwrap();

    let good = dir.path().join("good");
    credentials(&good, &ca, &ca);
    let c = tls_client(&addr, &good, "127.0.0.1").unwrap();
    c.write(8192, vec![9; 4096], false).unwrap();
    assert_eq!(c.read(8192, 4096).unwrap(), vec![9; 4096]);
    assert_eq!(mem.0.lock().unwrap()[8192], 9);
    drop(c);

    // The server's certificate does not hold this name.
    let r = tls_client(&addr, &good, "node2.node.tessera");
    assert!(matches!(r, Err(ClientError::Tls(_))), "{:?}", r.err());

    // A client certificate of another cluster.
    let foreign = dir.path().join("foreign");
    credentials(&foreign, &ca, &other);
    assert!(tls_client(&addr, &foreign, "127.0.0.1")
        .and_then(|c| c.read(0, 512))
        .is_err());

    // A server certificate of another cluster (the client trusts only `other`).
    let distrust = dir.path().join("distrust");
    credentials(&distrust, &other, &ca);
    let r = tls_client(&addr, &distrust, "127.0.0.1");
    assert!(matches!(r, Err(ClientError::Tls(_))), "{:?}", r.err());

    // Without TLS the server says so, and the client explains it.
    let r = PipelinedClient::connect(
        Target {
            endpoint: Endpoint::Tcp(addr.clone()),
            export: "disk".into(),
            tls: None,
        },
        Timeouts::default(),
    );
    match r {
        Err(ClientError::Tls(m)) => assert!(m.contains("requires TLS"), "{m}"),
        other => panic!("a plain client got {:?}", other.err()),
    }
}
