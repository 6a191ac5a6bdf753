//! `tessera vm console NAME`: a VM's serial console in the terminal, through the API's
//! WebSocket (ask the node the VM runs on). On a terminal the input is raw (every key goes
//! to the guest) and `Ctrl-]` leaves; otherwise standard input is sent as it comes and the
//! output printed until the console closes.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::mpsc;
use std::time::Duration;

use anyhow::{bail, Context};
use tungstenite::client::IntoClientRequest;
use tungstenite::Message;

use crate::client::Client;
use crate::endpoints::{fill, VM_CONSOLE};

/// The byte `Ctrl-]` sends.
const LEAVE: u8 = 0x1d;

/// The terminal's settings, restored when dropped.
struct RawMode(nix::sys::termios::Termios);

impl RawMode {
    fn enter() -> Option<RawMode> {
        use nix::sys::termios::{cfmakeraw, tcgetattr, tcsetattr, OutputFlags, SetArg};
        let stdin = std::io::stdin();
        let saved = tcgetattr(&stdin).ok()?;
        let mut raw = saved.clone();
        cfmakeraw(&mut raw);
        // Output stays cooked: the guest's "\n" starts a new line.
        raw.output_flags |= OutputFlags::OPOST | OutputFlags::ONLCR;
        tcsetattr(&stdin, SetArg::TCSANOW, &raw).ok()?;
        Some(RawMode(saved))
    }
}

impl Drop for RawMode {
    fn drop(&mut self) {
        let _ = nix::sys::termios::tcsetattr(
            std::io::stdin(),
            nix::sys::termios::SetArg::TCSANOW,
            &self.0,
        );
    }
}

enum Input {
    Data(Vec<u8>),
    Leave,
    Eof,
}

pub fn attach(client: &Client, name: &str) -> anyhow::Result<()> {
    let api = client.api().trim_end_matches('/');
    let Some(authority) = api.strip_prefix("https://") else {
        bail!("the API address {api} is not https://HOST:PORT");
    };
    let authority = authority.split('/').next().unwrap_or(authority);
    let host = match authority.rsplit_once(':') {
        Some((h, p)) if p.chars().all(|c| c.is_ascii_digit()) => h,
        _ => authority,
    };
    let host = host.trim_start_matches('[').trim_end_matches(']');
    let addr = if authority.contains(':') && !authority.ends_with(']') {
        authority.to_string()
    } else {
        format!("{authority}:443")
    };
    let tcp = TcpStream::connect(&addr).with_context(|| format!("connecting to {addr}"))?;
    let tls = client
        .tls()
        .context("the console needs the cluster CA (--ca-file or tessera login)")?;
    let server = rustls_pki_types::ServerName::try_from(host.to_string())
        .with_context(|| format!("{host} is not a host name or address"))?;
    let conn = rustls::ClientConnection::new(tls, server).context("TLS")?;
    let stream = rustls::StreamOwned::new(conn, tcp);
    let url = format!("wss://{authority}{}", fill(VM_CONSOLE.1, &[name]));
    let mut req = url.as_str().into_client_request()?;
    if let Some(t) = client.token() {
        req.headers_mut()
            .insert("Authorization", format!("Bearer {t}").parse()?);
    }
    let (mut ws, _) = match tungstenite::client(req, stream) {
        Ok(x) => x,
        Err(tungstenite::HandshakeError::Failure(tungstenite::Error::Http(resp))) => {
            let body = resp.body().as_deref().unwrap_or_default();
            let v: serde_json::Value = serde_json::from_slice(body).unwrap_or_default();
            bail!(
                "GET {}: HTTP {}: {}",
                VM_CONSOLE.1,
                resp.status().as_u16(),
                v["error"].as_str().unwrap_or("no details")
            );
        }
        Err(e) => bail!("opening the console: {e}"),
    };
    ws.get_mut()
        .sock
        .set_read_timeout(Some(Duration::from_millis(50)))?;
    let raw = if std::io::IsTerminal::is_terminal(&std::io::stdin()) {
        eprint!("[console of VM {name}: Ctrl-] leaves]\r\n");
        RawMode::enter()
    } else {
        None
    };
    let interactive = raw.is_some();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut buf = [0u8; 1024];
        let mut stdin = std::io::stdin();
        loop {
            match stdin.read(&mut buf) {
                Ok(0) | Err(_) => {
                    let _ = tx.send(Input::Eof);
                    return;
                }
                Ok(n) => {
                    let data = &buf[..n];
                    if interactive {
                        if let Some(i) = data.iter().position(|b| *b == LEAVE) {
                            let _ = tx.send(Input::Data(data[..i].to_vec()));
                            let _ = tx.send(Input::Leave);
                            return;
                        }
                    }
                    if tx.send(Input::Data(data.to_vec())).is_err() {
                        return;
                    }
                }
            }
        }
    });
    let mut out = std::io::stdout();
    loop {
        match ws.read() {
            Ok(Message::Text(t)) => {
                out.write_all(t.as_bytes())?;
                out.flush()?;
            }
            Ok(Message::Binary(b)) => {
                out.write_all(&b)?;
                out.flush()?;
            }
            Ok(Message::Close(_)) => break,
            Ok(_) => {}
            Err(tungstenite::Error::Io(e))
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            Err(tungstenite::Error::ConnectionClosed) => break,
            Err(e) => {
                drop(raw);
                bail!("console: {e}");
            }
        }
        while let Ok(input) = rx.try_recv() {
            match input {
                Input::Data(d) if !d.is_empty() => {
                    ws.send(Message::Binary(d.into()))?;
                }
                Input::Data(_) | Input::Eof => {}
                Input::Leave => {
                    let _ = ws.close(None);
                    drop(raw);
                    eprintln!("\n[left the console of VM {name}]");
                    return Ok(());
                }
            }
        }
    }
    drop(raw);
    eprintln!("\n[the console of VM {name} closed]");
    Ok(())
}
