//! The upgrade upload's integrity checks (`PUT /api/v1/nodes/{id}/upgrade`,
//! docs/image.md), against a real `tesserad` without booting the image: a one-node
//! cluster on a loopback address, started in a mount namespace of its own where
//! `/proc/cmdline` says `tessera.slot=a` and `/dev/disk/by-partlabel` holds the two slots'
//! names, so that it takes uploads as a node booted from the image would. Root file
//! system images are made by `mkfs.ext4`, sent by curl and by `tessera node upgrade`.
//! Checked: an image that does not hash to the blake3 given (truncated, one byte
//! changed), a missing or malformed blake3 and a wrong label are 400 and leave nothing on
//! the data partition; the CLI refuses a corrupt image before sending it; a good image is
//! kept with its blake3 in the request the upgrade service takes.
//! (What the node does with it, under qemu: tests/image/upgrade.)

// Test code: the unexpected should panic where it happens (see tests/src/lib.rs).
#![allow(clippy::unwrap_used)]
#![forbid(unsafe_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use serde_json::Value;
use tessera_tests::cluster::wait_for;
use tessera_tests::{bin, file_hash, output, require, run};

const ADDR: &str = "127.77.14.2";

const SEED: &str = r#"
cluster_name = "upload"
join_secret = "upload-test-secret-0123456789"
expected_nodes = 1
hostname = "node-u"
[network]
mode = "static"
interface = "lo"
address = "127.77.14.2/8"
"#;

/// Starts `tesserad` as the image's slot `a` would: the kernel command line and the
/// slots' partition links are the namespace's own; the rest of /dev is the host's.
const AS_SLOT_A: &str = r#"
fake=$1; shift
mount --bind "$fake/cmdline" /proc/cmdline
mkdir -p "$fake/realdev"
mount --rbind /dev "$fake/realdev"
mount -t tmpfs -o mode=0755 tessera-test-dev /dev
for n in null zero full random urandom tty; do
    if [ -e "$fake/realdev/$n" ]; then touch "/dev/$n"; mount --bind "$fake/realdev/$n" "/dev/$n"; fi
done
mkdir -p /dev/disk/by-partlabel /dev/shm /dev/pts
touch /dev/disk/by-partlabel/tessera-root-a /dev/disk/by-partlabel/tessera-root-b
exec "$@"
"#;

struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

struct Node {
    data: PathBuf,
    token: String,
    id: String,
    _tesserad: Killed,
    _store: Killed,
}

impl Node {
    fn ca(&self) -> PathBuf {
        self.data.join("tls/ca.crt")
    }

    /// curl against the node's API: the status and the body.
    fn curl(&self, args: &[&str], path: &str) -> (u16, String) {
        let out = run(Command::new("curl")
            .args(["-sS", "--max-time", "60", "--cacert"])
            .arg(self.ca())
            .args(["-H", &format!("authorization: Bearer {}", self.token)])
            .args(["-w", "\n%{http_code}"])
            .args(args)
            .arg(format!("https://{ADDR}:8006/api/v1{path}")));
        let (body, code) = out.rsplit_once('\n').unwrap();
        (code.trim().parse().unwrap(), body.to_string())
    }

    fn upload(&self, image: &Path, query: &str) -> (u16, String) {
        let body = format!("@{}", image.display());
        self.curl(
            &[
                "-X",
                "PUT",
                "-H",
                "content-type: application/octet-stream",
                "--data-binary",
                &body,
            ],
            &format!("/nodes/{}/upgrade{query}", self.id),
        )
    }

    fn upgrade_dir(&self) -> PathBuf {
        self.data.join("upgrade")
    }

    /// Nothing kept: no image, no request, no record, and the API says no upgrade.
    fn assert_nothing_changed(&self, after: &str) {
        for f in ["root.img", "root.img.new", "request.json", "state.json"] {
            assert!(
                !self.upgrade_dir().join(f).exists(),
                "{after}: {f} was left on the data partition"
            );
        }
        let (code, body) = self.curl(&[], &format!("/nodes/{}/upgrade", self.id));
        assert_eq!(code, 200, "{after}: {body}");
        let v: Value = serde_json::from_str(&body).unwrap();
        assert!(v["slot"] == "a" && v["last"].is_null(), "{after}: {v}");
    }
}

fn login(ca: &Path, user_pw: (&str, &str)) -> Option<String> {
    let body = serde_json::json!({"username": user_pw.0, "password": user_pw.1}).to_string();
    let out = output(
        Command::new("curl")
            .args(["-sS", "--max-time", "60", "--cacert"])
            .arg(ca)
            .args(["-H", "content-type: application/json", "-d", &body])
            .arg(format!("https://{ADDR}:8006/api/v1/login")),
    );
    let v: Value = serde_json::from_slice(&out.stdout).ok()?;
    v["token"].as_str().map(str::to_string)
}

fn start_node(dir: &Path) -> Node {
    let (etc, data, store_dir) = (dir.join("etc"), dir.join("data"), dir.join("store"));
    std::fs::create_dir_all(&etc).unwrap();
    let port_free = std::net::UdpSocket::bind(format!("{ADDR}:7946")).is_ok()
        && std::net::TcpListener::bind(format!("{ADDR}:8006")).is_ok();
    assert!(
        port_free,
        "{ADDR}:7946/8006 are taken: another run of this test?"
    );
    let store = Killed(
        Command::new(bin("tessera-store"))
            .args(["serve", "--data-dir"])
            .arg(&store_dir)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    // tesserad's seed as the image makes it (tessera-firstboot), alone on loopback.
    let seed = dir.join("seed.toml");
    std::fs::write(&seed, SEED).unwrap();
    for (cmd, flag, path) in [
        ("apply", "--from", &seed),
        ("tesserad-seed", "--data-dir", &data),
    ] {
        run(Command::new(bin("tessera-firstboot"))
            .arg("--etc")
            .arg(&etc)
            .args([cmd, flag])
            .arg(path));
    }
    let seed_path = etc.join("tessera/seed.toml");
    let text = std::fs::read_to_string(&seed_path)
        .unwrap()
        .replace("[management]", "[management]\nuse_multicast = false")
        .replace(
            "[storage]",
            &format!(
                "[storage]\nadmin_socket = \"{}\"",
                store_dir.join("admin.sock").display()
            ),
        );
    std::fs::write(&seed_path, text).unwrap();

    let fake = dir.join("fake");
    std::fs::create_dir_all(&fake).unwrap();
    std::fs::write(
        fake.join("cmdline"),
        "BOOT_IMAGE=/tessera/a/vmlinuz root=PARTUUID=0 rw tessera.slot=a quiet\n",
    )
    .unwrap();
    let log = std::fs::File::create(dir.join("tesserad.log")).unwrap();
    let tesserad = Killed(
        Command::new("unshare")
            .args([
                "--mount",
                "--propagation",
                "private",
                "sh",
                "-ec",
                AS_SLOT_A,
                "sh",
            ])
            .arg(&fake)
            .arg(bin("tesserad"))
            .arg("--seed")
            .arg(&seed_path)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap(),
    );

    // The first administrator: its password from the data directory, changed at once.
    let ca = data.join("tls/ca.crt");
    let pw_file = data.join("initial-admin-password");
    let first = wait_for("the first administrator's password and the CA", 90, || {
        let pw = std::fs::read_to_string(&pw_file).ok()?;
        ca.exists().then_some(())?;
        login(&ca, ("admin", pw.trim())).map(|t| (pw.trim().to_string(), t))
    });
    let new_pw = "upload-test-password-0123";
    let change = serde_json::json!({"old_password": first.0, "new_password": new_pw}).to_string();
    run(Command::new("curl")
        .args(["-sS", "-f", "--cacert"])
        .arg(&ca)
        .args(["-H", &format!("authorization: Bearer {}", first.1)])
        .args(["-H", "content-type: application/json", "-d", &change])
        .arg(format!("https://{ADDR}:8006/api/v1/password")));
    let token = login(&ca, ("admin", new_pw)).unwrap();
    let mut node = Node {
        data,
        token,
        id: String::new(),
        _tesserad: tesserad,
        _store: store,
    };
    let (code, body) = node.curl(&[], "/nodes");
    assert_eq!(code, 200, "{body}");
    let nodes: Value = serde_json::from_str(&body).unwrap();
    node.id = nodes[0]["id"].as_str().unwrap().to_string();
    node
}

/// A root file system image as image/build labels it, with some content to hash.
fn root_image(dir: &Path, name: &str, label: &str) -> PathBuf {
    let content = dir.join(format!("{name}.d/etc"));
    std::fs::create_dir_all(&content).unwrap();
    let noise: Vec<u8> = (0..3u32 << 20)
        .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
        .collect();
    std::fs::write(content.join("tessera-release"), format!("{name}\n")).unwrap();
    std::fs::write(content.join("payload"), noise).unwrap();
    let img = dir.join(name);
    run(Command::new("mkfs.ext4")
        .args(["-q", "-F", "-L", label, "-d"])
        .arg(content.parent().unwrap())
        .arg(&img)
        .arg("8M"));
    img
}

#[test]
fn an_upgrade_image_is_kept_only_when_it_hashes_to_the_blake3_sent_with_it() {
    if !nix::unistd::geteuid().is_root() {
        tessera_tests::skip(
            "an_upgrade_image_is_kept_only_when_it_hashes_to_the_blake3_sent_with_it",
            "needs root (a mount namespace for the node's slots)",
        );
        return;
    }
    for tool in ["curl", "mkfs.ext4", "unshare"] {
        require(tool);
    }
    let dir = tempfile::tempdir().unwrap();
    let node = start_node(dir.path());
    node.assert_nothing_changed("at the start");

    let good = root_image(dir.path(), "good.img", "tessera-root");
    let hash = file_hash(&good).to_hex().to_string();
    let bytes = std::fs::read(&good).unwrap();

    // Refused before anything is received or kept.
    let (code, body) = node.upload(&good, "");
    assert_eq!(code, 400, "no blake3: {body}");
    assert!(body.contains("blake3: required"), "{body}");
    node.assert_nothing_changed("no blake3");
    let (code, body) = node.upload(&good, "?blake3=abc");
    assert_eq!(code, 400, "a short blake3: {body}");
    assert!(body.contains("not a blake3"), "{body}");
    node.assert_nothing_changed("a malformed blake3");

    // Received, hashed, and refused: the image is not the one the blake3 names.
    let truncated = dir.path().join("truncated.img");
    std::fs::write(&truncated, &bytes[..bytes.len() / 2]).unwrap();
    let flipped = dir.path().join("flipped.img");
    let mut changed = bytes.clone();
    changed[5 << 20] ^= 0x20;
    std::fs::write(&flipped, &changed).unwrap();
    for (img, what) in [(&truncated, "truncated"), (&flipped, "one byte changed")] {
        let (code, body) = node.upload(img, &format!("?blake3={hash}"));
        assert_eq!(code, 400, "{what}: {body}");
        assert!(
            body.contains(&format!("not the {hash} given")) && body.contains("nothing was kept"),
            "{what}: {body}"
        );
        node.assert_nothing_changed(what);
    }
    let other = root_image(dir.path(), "other.img", "other-root");
    let other_hash = file_hash(&other).to_hex().to_string();
    let (code, body) = node.upload(&other, &format!("?blake3={other_hash}"));
    assert_eq!(code, 400, "another label: {body}");
    assert!(body.contains("labelled \\\"other-root\\\""), "{body}");
    node.assert_nothing_changed("another label");

    // The CLI checks the image against IMAGE.b3 before it sends anything.
    let home = dir.path().join("home");
    std::fs::create_dir_all(home.join("tessera")).unwrap();
    let creds = serde_json::json!({
        "api": format!("https://{ADDR}:8006"),
        "token": node.token,
        "ca_pem": std::fs::read_to_string(node.ca()).unwrap(),
    });
    let creds_path = home.join("tessera/credentials.json");
    std::fs::write(&creds_path, creds.to_string()).unwrap();
    std::fs::set_permissions(
        &creds_path,
        std::os::unix::fs::PermissionsExt::from_mode(0o600),
    )
    .unwrap();
    // `tessera node upgrade` with IMAGE.b3 beside the image saying `b3` (none: no file).
    let cli = |image: &Path, b3: Option<&str>| {
        let sum = PathBuf::from(format!("{}.b3", image.display()));
        match b3 {
            Some(h) => std::fs::write(&sum, format!("{h}  tessera-root.img\n")).unwrap(),
            None => assert!(!sum.exists()),
        }
        output(
            Command::new(bin("tessera"))
                .env("XDG_CONFIG_HOME", &home)
                .args([
                    "node",
                    "upgrade",
                    "node-u",
                    "--no-drain",
                    "--timeout",
                    "2",
                    "--image",
                ])
                .arg(image),
        )
    };
    let out = cli(&flipped, None);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("flipped.img.b3"),
        "no .b3: {err}"
    );
    let out = cli(&flipped, Some(&hash));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("corrupt or truncated; nothing sent"),
        "a corrupt image: {err}"
    );
    node.assert_nothing_changed("the CLI with a corrupt image");

    // The good image with its blake3, by the CLI: kept, with its blake3 in the request
    // the upgrade service takes (which checks it again before writing the slot). No
    // upgrade service runs here, so the CLI's follow runs out of time: that is expected.
    let out = cli(&good, Some(&hash));
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(said.contains(&format!("({} bytes)", bytes.len())), "{said}");
    let request: Value = serde_json::from_str(
        &std::fs::read_to_string(node.upgrade_dir().join("request.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(request["blake3"], hash.as_str(), "{request}");
    assert_eq!(request["bytes"], bytes.len() as u64, "{request}");
    assert_eq!(
        file_hash(&node.upgrade_dir().join("root.img"))
            .to_hex()
            .to_string(),
        hash
    );
    let (code, body) = node.curl(&[], &format!("/nodes/{}/upgrade", node.id));
    assert_eq!(code, 200, "{body}");
    let v: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["last"]["state"], "applying", "{v}");
    assert_eq!(v["last"]["to_slot"], "b", "{v}");
    // And with one under way, the next upload is 409 (curl, the right blake3).
    let (code, body) = node.upload(&good, &format!("?blake3={hash}"));
    assert_eq!(code, 409, "{body}");
}
