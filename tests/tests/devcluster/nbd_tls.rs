//! Part of `devcluster`: NBD over TCP on the running local cluster — served only over TLS
//! with the cluster's client certificates (nbdinfo, nbdcopy, qemu-img), refused without.

use std::process::Command;
use std::time::{Duration, Instant};

use tessera_tests::{output, require};

use super::cli;

/// `nbdinfo` with these arguments; returns (success, stdout).
fn nbdinfo(args: &[&str]) -> (bool, String) {
    let out = output(Command::new("nbdinfo").args(args));
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
    )
}

fn nbds(export: &str, creds: &std::path::Path) -> String {
    format!(
        "nbds://127.0.0.3:10809/{export}?tls-certificates={}",
        creds.display()
    )
}

/// NBD over TCP on the running cluster: served with `tessera volume export-creds`'
/// certificate to nbdinfo, nbdcopy and qemu-img; the key is private.
pub fn check_nbd_tls(h: &std::path::Path) {
    let creds = h.join("nbd-creds");
    let (ok, out, err) = cli(
        h,
        &[
            "volume",
            "export-creds",
            "--dir",
            &creds.display().to_string(),
        ],
        "",
    );
    assert!(ok, "export-creds: {err}");
    assert!(out.contains("nbds://"), "{out}");
    for f in ["ca-cert.pem", "client-cert.pem", "client-key.pem"] {
        let mode = std::os::unix::fs::PermissionsExt::mode(
            &std::fs::metadata(creds.join(f)).unwrap().permissions(),
        );
        assert_eq!(mode & 0o077, 0, "{f} is open to group or others: {mode:o}");
    }
    // The store may bind its TLS listener a moment after tesserad wrote its certificate.
    let deadline = Instant::now() + Duration::from_secs(20);
    let size = loop {
        let (ok, out) = nbdinfo(&["--size", &nbds("vol2", &creds)]);
        if ok || Instant::now() > deadline {
            break out;
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    assert_eq!(
        size.trim(),
        "67108864",
        "nbdinfo over TLS with exported credentials"
    );
    // qemu's client with the same directory.
    let out = output(
        Command::new("qemu-img")
            .arg("info")
            .arg("--object")
            .arg(format!(
                "tls-creds-x509,id=tls0,dir={},endpoint=client",
                creds.display()
            ))
            .arg("--image-opts")
            .arg("driver=nbd,host=127.0.0.3,port=10809,export=vol2,tls-creds=tls0"),
    );
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("(67108864 bytes)"),
        "qemu-img over TLS: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Data in and back out through TLS.
    let data: Vec<u8> = (0..1 << 20).map(|i: u32| (i * 7 % 251) as u8).collect();
    let (input, back) = (h.join("in.img"), h.join("back.img"));
    std::fs::write(&input, &data).unwrap();
    let uri = nbds("vol1", &creds);
    assert!(output(Command::new("nbdcopy").arg(&input).arg(&uri))
        .status
        .success());
    assert!(output(Command::new("nbdcopy").arg(&uri).arg(&back))
        .status
        .success());
    let read = std::fs::read(&back).unwrap();
    assert!(
        read.len() == 64 << 20 && read[..data.len()] == data[..],
        "nbdcopy over TLS did not read back what it wrote"
    );
}

/// Makes a CA of another cluster with openssl and a client certificate from it.
fn foreign_client_cert(dir: &std::path::Path) {
    let sh = |script: &str| {
        let out = output(Command::new("sh").arg("-ec").arg(script).current_dir(dir));
        assert!(
            out.status.success(),
            "{script}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    sh(
        "openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes \
        -keyout other-ca.key -out other-ca.pem -days 30 -subj /CN=other-cluster-CA 2>/dev/null
        openssl req -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes \
        -keyout client-key.pem -out client.csr -subj /CN=admin 2>/dev/null
        printf 'extendedKeyUsage=clientAuth\\n' > ext
        openssl x509 -req -in client.csr -CA other-ca.pem -CAkey other-ca.key \
        -CAcreateserial -out client-cert.pem -days 30 -extfile ext 2>/dev/null",
    );
}

/// NBD over TCP refuses a client without TLS (which does not even learn the export
/// names), one without a client certificate, one with another cluster's certificate, and
/// an Auditor asking for credentials; a node's own certificate is accepted (a VMM on
/// another node reaches its disk with it).
pub fn check_nbd_tls_refusals(h: &std::path::Path, ca: &str) {
    require("openssl");
    let (ok, _) = nbdinfo(&["--size", "nbd://127.0.0.3:10809/vol1"]);
    assert!(!ok, "plain NBD over TCP was served");
    let (_, list) = nbdinfo(&["--list", "nbd://127.0.0.3:10809"]);
    assert!(
        !list.contains("vol1"),
        "a plain client listed the exports: {list}"
    );
    let only_ca = h.join("only-ca");
    std::fs::create_dir_all(&only_ca).unwrap();
    std::fs::copy(ca, only_ca.join("ca-cert.pem")).unwrap();
    let (ok, _) = nbdinfo(&["--size", &nbds("vol1", &only_ca)]);
    assert!(!ok, "a TLS client without a certificate was served");
    let foreign = h.join("foreign");
    std::fs::create_dir_all(&foreign).unwrap();
    foreign_client_cert(&foreign);
    std::fs::copy(ca, foreign.join("ca-cert.pem")).unwrap();
    let (ok, _) = nbdinfo(&["--size", &nbds("vol1", &foreign)]);
    assert!(!ok, "a client certificate of another cluster was served");
    // Node 1's own credentials (root-only files in its data directory).
    let tls = std::path::Path::new(ca).parent().unwrap();
    let node = h.join("node1-creds");
    std::fs::create_dir_all(&node).unwrap();
    for (from, to) in [
        ("ca.crt", "ca-cert.pem"),
        ("node.crt", "client-cert.pem"),
        ("node.key", "client-key.pem"),
    ] {
        std::fs::copy(tls.join(from), node.join(to)).unwrap();
    }
    let (ok, size) = nbdinfo(&["--size", &nbds("vol1", &node)]);
    assert!(
        ok && size.trim() == "67108864",
        "node 1's certificate was refused"
    );
    // An Auditor may not have NBD credentials (they open every volume for writing).
    let (ok, out, err) = cli(
        h,
        &[
            "--output",
            "json",
            "token",
            "create",
            "--role",
            "auditor",
            "--expires",
            "1h",
        ],
        "",
    );
    assert!(ok, "{err}");
    let token = serde_json::from_str::<serde_json::Value>(&out).unwrap()["token"]
        .as_str()
        .unwrap()
        .to_string();
    let out = output(Command::new("curl").args([
        "-s",
        "-m",
        "20",
        "-o",
        "/dev/null",
        "-w",
        "%{http_code}",
        "--cacert",
        ca,
        "-X",
        "POST",
        "-H",
        &format!("Authorization: Bearer {token}"),
        "https://127.0.0.3:8006/api/v1/nbd/credentials",
    ]));
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "403",
        "an Auditor got NBD credentials"
    );
}
