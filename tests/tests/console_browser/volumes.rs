//! Growing a volume, in the console test's cluster and browser session: the Volumes page's
//! resize form grows a one-copy volume, and clients we did not write (nbdinfo, qemu-img,
//! qemu-io over NBD with TLS) see the new size with the data kept and the new end zeroed;
//! a smaller size is refused with the API's words next to the size field; the CLI's
//! `tessera volume resize` grows it again; a volume of two copies is grown from the form
//! too; bad sizes are 400 naming the field, an unknown volume 404.

use std::path::Path;
use std::process::{Command, Stdio};

use fantoccini::Client;
use serde_json::{json, Value};
use tessera_tests::{bin, output, require};

use super::{el, fetch, fill, go, select, shot, submit, wait_js, NEW_PASSWORD};

const MIB: u64 = 1 << 20;

/// Writes the NBD client certificate the API issues (as `tessera volume export-creds`
/// does) into `dir`.
async fn nbd_creds(c: &Client, dir: &Path) {
    let (code, v) = fetch(c, "POST", "nbd/credentials", None).await;
    assert_eq!(code, 200, "{v}");
    std::fs::create_dir_all(dir).unwrap();
    for (file, key) in [
        ("ca-cert.pem", "ca_cert_pem"),
        ("client-cert.pem", "client_cert_pem"),
        ("client-key.pem", "client_key_pem"),
    ] {
        std::fs::write(dir.join(file), v[key].as_str().unwrap()).unwrap();
    }
}

/// `host` and `port` of a volume's `nbds://host:port/name` URI.
fn nbd_address(v: &Value) -> (String, String) {
    let uri = v["nbd"]
        .as_str()
        .unwrap_or_else(|| panic!("no nbd URI: {v}"));
    let rest = uri.strip_prefix("nbds://").unwrap();
    let hostport = rest.split('/').next().unwrap();
    let (h, p) = hostport.rsplit_once(':').unwrap();
    (h.to_string(), p.to_string())
}

/// qemu-io's `cmd` on the export over TLS; whether every pattern matched.
fn qemu_io(creds: &Path, host: &str, port: &str, export: &str, cmd: &str) -> bool {
    let out = output(
        Command::new("qemu-io")
            .arg("--object")
            .arg(format!(
                "tls-creds-x509,id=tls0,dir={},endpoint=client",
                creds.display()
            ))
            .arg("--image-opts")
            .arg(format!(
                "driver=nbd,host={host},port={port},export={export},tls-creds=tls0"
            ))
            .args(["-c", cmd]),
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "qemu-io {cmd}: {text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    !text.contains("Pattern verification failed")
}

/// The export's size, by nbdinfo and by qemu-img (both must agree).
fn export_size(creds: &Path, host: &str, port: &str, export: &str) -> u64 {
    let uri = format!(
        "nbds://{host}:{port}/{export}?tls-certificates={}",
        creds.display()
    );
    let out = output(Command::new("nbdinfo").args(["--size", &uri]));
    assert!(
        out.status.success(),
        "nbdinfo: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let by_nbdinfo: u64 = String::from_utf8_lossy(&out.stdout).trim().parse().unwrap();
    let out = output(
        Command::new("qemu-img")
            .arg("info")
            .arg("--output=json")
            .arg("--object")
            .arg(format!(
                "tls-creds-x509,id=tls0,dir={},endpoint=client",
                creds.display()
            ))
            .arg("--image-opts")
            .arg(format!(
                "driver=nbd,host={host},port={port},export={export},tls-creds=tls0"
            )),
    );
    let info: Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "qemu-img info: {e}: {}",
            String::from_utf8_lossy(&out.stderr)
        )
    });
    assert_eq!(
        info["virtual-size"], by_nbdinfo,
        "qemu-img and nbdinfo: {info}"
    );
    by_nbdinfo
}

/// Polls `GET /volumes/{name}` (at most 60 s) until `ready(volume)`.
async fn volume_when(c: &Client, name: &str, what: &str, ready: impl Fn(&Value) -> bool) -> Value {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    loop {
        let (code, v) = fetch(c, "GET", &format!("volumes/{name}"), None).await;
        if code == 200 && ready(&v) {
            return v;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "volume {name}: {what}: {code} {v}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
}

/// `tessera` with `HOME` at `home`: (success, stdout, stderr).
fn cli(home: &Path, args: &[&str], stdin: &str) -> (bool, String, String) {
    use std::io::Write;
    let mut child = Command::new(bin("tessera"))
        .args(args)
        .env("HOME", home)
        .env_remove("XDG_CONFIG_HOME")
        .env_remove("TESSERA_API")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(stdin.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// The checks; the browser is logged in as an administrator on `origin`; `ca` is the
/// cluster CA's file.
pub async fn check(c: &Client, origin: &str, ca: &str) {
    for t in ["nbdinfo", "qemu-img", "qemu-io"] {
        require(t);
    }
    let tmp = tempfile::tempdir().unwrap();
    let creds = tmp.path().join("nbd");
    nbd_creds(c, &creds).await;

    // A one-copy volume of 16 MiB with data at its start and its end.
    let (code, t) = fetch(
        c,
        "POST",
        "volumes",
        Some(json!({"name": "grow", "size_bytes": 16 * MIB, "replicas": 1})),
    )
    .await;
    assert_eq!(code, 202, "{t}");
    let v = volume_when(c, "grow", "ready", |v| v["state"] == "ready").await;
    let (host, port) = nbd_address(&v);
    // The store may bind its TLS listener a moment after the volume is ready.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while !output(Command::new("nbdinfo").args([
        "--size",
        &format!(
            "nbds://{host}:{port}/grow?tls-certificates={}",
            creds.display()
        ),
    ]))
    .status
    .success()
    {
        assert!(
            std::time::Instant::now() < deadline,
            "no NBD export of grow"
        );
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
    assert_eq!(export_size(&creds, &host, &port, "grow"), 16 * MIB);
    assert!(qemu_io(&creds, &host, &port, "grow", "write -P 0xa5 0 1M"));
    assert!(qemu_io(
        &creds,
        &host,
        &port,
        "grow",
        "write -P 0x5a 15M 1M"
    ));

    // Grown to 32 MiB from the Volumes page.
    go(c, origin, "volumes").await;
    el(c, "#volume-resize").await;
    select(c, "#volume-resize", "volume", "grow").await;
    fill(c, "#volume-resize", "size_bytes", "32").await;
    select(c, "#volume-resize", "size_bytes_unit", &MIB.to_string()).await;
    submit(c, "#volume-resize").await;
    wait_js(
        c,
        "const r = document.querySelector('tr[data-volume=\"grow\"]'); return r && r.innerText.includes('32 MiB')",
        "volume grow listed at 32 MiB",
    )
    .await;
    shot(c, "volume-resize").await;
    let v = volume_when(c, "grow", "32 MiB", |v| v["size_bytes"] == 32 * MIB).await;
    assert_eq!(v["state"], "ready", "{v}");
    assert_eq!(export_size(&creds, &host, &port, "grow"), 32 * MIB);
    assert!(
        qemu_io(&creds, &host, &port, "grow", "read -P 0xa5 0 1M"),
        "the start's data after the resize"
    );
    assert!(
        qemu_io(&creds, &host, &port, "grow", "read -P 0x5a 15M 1M"),
        "the old end's data after the resize"
    );
    assert!(
        qemu_io(&creds, &host, &port, "grow", "read -P 0 16M 16M"),
        "the new part reads as zeros"
    );
    assert!(qemu_io(
        &creds,
        &host,
        &port,
        "grow",
        "write -P 0x3c 31M 1M"
    ));

    // Smaller: refused, the API's words next to the size; nothing changed. The form is
    // made afresh once the resize ended (its sizes were old).
    wait_js(
        c,
        "const f = document.getElementById('volume-resize'); \
         const o = f && f.querySelector('select[name=volume] option[value=grow]'); \
         return o && o.textContent.includes('32 MiB') && !f.dataset.busy",
        "a fresh resize form",
    )
    .await;
    select(c, "#volume-resize", "volume", "grow").await;
    fill(c, "#volume-resize", "size_bytes", "8").await;
    select(c, "#volume-resize", "size_bytes_unit", &MIB.to_string()).await;
    submit(c, "#volume-resize").await;
    let msg = wait_js(
        c,
        "return document.getElementById('f-resize-size-error').textContent",
        "the shrink's refusal next to the size",
    )
    .await;
    let msg = msg.as_str().unwrap();
    assert!(
        msg.starts_with("size_bytes:") && msg.contains("only grow"),
        "{msg}"
    );
    assert_eq!(export_size(&creds, &host, &port, "grow"), 32 * MIB);

    // The API's edges.
    for (body, code, words) in [
        (json!({"size_bytes": 1000}), 400, "size_bytes"),
        (json!({"size_bytes": "big"}), 400, "size_bytes"),
        (json!({"size_bytes": 64 * MIB, "colour": 1}), 400, "colour"),
        (json!({"size_bytes": 16 * MIB}), 409, "only grow"),
    ] {
        let (got, v) = fetch(c, "POST", "volumes/grow/resize", Some(body.clone())).await;
        assert_eq!(got, code, "{body}: {v}");
        assert!(v["error"].as_str().unwrap().contains(words), "{body}: {v}");
    }
    let (got, v) = fetch(
        c,
        "POST",
        "volumes/no-such/resize",
        Some(json!({"size_bytes": MIB})),
    )
    .await;
    assert_eq!(got, 404, "{v}");

    // The CLI grows it to 48 MiB, waiting for the task.
    let home = tmp.path().join("home");
    std::fs::create_dir_all(&home).unwrap();
    let api = format!("--api={origin}");
    let ca_arg = format!("--ca-file={ca}");
    let (ok, _, err) = cli(
        &home,
        &[&api, &ca_arg, "login", "--user", "admin"],
        &format!("{NEW_PASSWORD}\n"),
    );
    assert!(ok, "tessera login: {err}");
    let (ok, out, err) = cli(&home, &["volume", "resize", "grow", "--size", "48M"], "");
    assert!(ok, "tessera volume resize: {out}{err}");
    assert_eq!(export_size(&creds, &host, &port, "grow"), 48 * MIB);
    let (ok, out, err) = cli(&home, &["volume", "resize", "grow", "--size", "1M"], "");
    assert!(!ok && err.contains("only grow"), "{out}{err}");
    assert!(qemu_io(&creds, &host, &port, "grow", "read -P 0x3c 31M 1M"));

    // A replicated volume: offered by the form and grown from it like the other (every
    // copy grows through the replication stream: tests/tests/volume_replication/).
    let (code, t) = fetch(
        c,
        "POST",
        "volumes",
        Some(json!({"name": "grow-copies", "size_bytes": 4 * MIB, "replicas": 2})),
    )
    .await;
    assert_eq!(code, 202, "{t}");
    volume_when(c, "grow-copies", "ready", |v| v["state"] == "ready").await;
    // A fresh page: the form the refused shrink left filled in is kept while it is.
    go(c, origin, "volumes").await;
    c.refresh().await.unwrap();
    wait_js(
        c,
        "const o = document.querySelector('#volume-resize select[name=volume] option[value=\"grow-copies\"]'); \
         return o && o.textContent",
        "grow-copies offered by the resize form",
    )
    .await;
    select(c, "#volume-resize", "volume", "grow-copies").await;
    fill(c, "#volume-resize", "size_bytes", "8").await;
    select(c, "#volume-resize", "size_bytes_unit", &MIB.to_string()).await;
    submit(c, "#volume-resize").await;
    let v = volume_when(
        c,
        "grow-copies",
        "grown to 8 MiB, both copies in sync",
        |v| {
            v["size_bytes"] == 8 * MIB
                && v["replication"]["copies"]
                    .as_array()
                    .is_some_and(|cs| cs.len() == 2 && cs.iter().all(|c| c["state"] == "in_sync"))
        },
    )
    .await;
    let (h2, p2) = nbd_address(&v);
    assert_eq!(export_size(&creds, &h2, &p2, "grow-copies"), 8 * MIB);
}
