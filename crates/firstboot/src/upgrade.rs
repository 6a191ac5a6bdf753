//! The node's side of an upgrade (docs/image.md, "Upgrades"): `upgrade-apply` writes the
//! root file system `tesserad` received to the slot that is not running and gives it a
//! boot entry with a boot counter, then reboots; `boot-check` (every boot, before
//! `boot-complete.target`) waits for the node to be healthy, so that systemd-bless-boot
//! marks a slot on trial good only then, and reboots a slot on trial that does not get
//! there, until systemd-boot runs out of tries for it and boots the other slot.
//! Both keep `/var/lib/tessera/upgrade/state.json` (the API's `UpgradeRecord`) up to date.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context};
use tessera_api::{UpgradeRecord, UpgradeRequest, UpgradeState};
use tessera_firstboot::slots::{self, Slot};

/// Set by systemd-boot when it booted an entry with a boot counter.
const BOOT_COUNT_VAR: &str =
    "/sys/firmware/efi/efivars/LoaderBootCountPath-4a67b082-0a4c-41cf-b6c7-440b29bb8c4f";
/// Where the new root is mounted to take its kernel, initrd and release and to carry this
/// node's own files over.
const MOUNT_AT: &str = "/run/tessera-upgrade/root";

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

fn record_path(dir: &Path) -> PathBuf {
    dir.join("state.json")
}

fn read_record(dir: &Path) -> Option<UpgradeRecord> {
    let text = std::fs::read_to_string(record_path(dir)).ok()?;
    serde_json::from_str(&text).ok()
}

fn write_record(dir: &Path, rec: &mut UpgradeRecord) -> anyhow::Result<()> {
    rec.updated_ms = now_ms();
    let text = serde_json::to_string_pretty(rec)?;
    crate::write_file(&record_path(dir), &text, 0o644)
}

/// The release a root holds (`etc/tessera-release`), "unknown" when it has none.
fn release_of(root: &Path) -> String {
    crate::this_release(&root.join("etc"))
}

fn booted() -> anyhow::Result<Slot> {
    let cmdline = std::fs::read_to_string("/proc/cmdline").context("reading /proc/cmdline")?;
    slots::booted_slot(&cmdline)
        .context("this system was not booted from a node image slot (no tessera.slot= on the kernel command line)")
}

fn entries_dir(esp: &Path) -> PathBuf {
    esp.join("loader/entries")
}

fn esp_entries(esp: &Path) -> anyhow::Result<Vec<slots::Entry>> {
    let dir = entries_dir(esp);
    let names: Vec<String> = std::fs::read_dir(&dir)
        .with_context(|| format!("listing {} (is the ESP mounted?)", dir.display()))?
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    Ok(slots::entries(names.iter().map(String::as_str)))
}

fn run(cmd: &str, args: &[&str]) -> anyhow::Result<()> {
    let st = Command::new(cmd)
        .args(args)
        .status()
        .with_context(|| format!("running {cmd}"))?;
    if !st.success() {
        bail!("{cmd} {} failed ({st})", args.join(" "));
    }
    Ok(())
}

/// `upgrade-apply`: the request `tesserad` left in `dir` (with `root.img`) goes to the
/// other slot; the node reboots into it on trial. The request and the image are removed
/// whatever happens; the record says how it went.
pub fn apply(dir: &Path, esp: &Path) -> anyhow::Result<()> {
    let req_path = dir.join("request.json");
    let text = std::fs::read_to_string(&req_path)
        .with_context(|| format!("reading {}", req_path.display()))?;
    let req: UpgradeRequest = serde_json::from_str(&text).context("the upgrade request")?;
    let from = booted()?;
    let to = from.other();
    let mut rec = UpgradeRecord {
        state: UpgradeState::Applying,
        from_slot: from.to_string(),
        from_release: release_of(Path::new("/")),
        to_slot: to.to_string(),
        to_release: None,
        tries: req.tries,
        by: req.by.clone(),
        message: format!("writing the new root file system to slot {to}"),
        updated_ms: 0,
    };
    write_record(dir, &mut rec)?;
    let res = check_blake3(&dir.join("root.img"), &req.blake3)
        .and_then(|()| write_slot(dir, esp, to, req.tries));
    let _ = std::fs::remove_file(dir.join("root.img"));
    let _ = std::fs::remove_file(&req_path);
    match res {
        Ok(release) => {
            rec.to_release = Some(release.clone());
            rec.state = UpgradeState::Rebooting;
            rec.message = format!(
                "slot {to} holds {release}; rebooting into it on trial ({} boot(s) to come back healthy)",
                req.tries
            );
            write_record(dir, &mut rec)?;
            eprintln!("{}", rec.message);
            run("systemctl", &["reboot"])
        }
        Err(e) => {
            rec.state = UpgradeState::Failed;
            rec.message = format!("upgrade not applied: {e:#}");
            write_record(dir, &mut rec)?;
            Err(e)
        }
    }
}

/// Checks the image against the blake3 `tesserad` checked it against on receipt, before
/// anything is touched: an image damaged on the data partition since then (or a request
/// that names another image) must not replace the other slot, which is the fallback.
pub fn check_blake3(image: &Path, want: &str) -> anyhow::Result<()> {
    let want = tessera_api::parse_blake3(want).map_err(anyhow::Error::msg)?;
    let mut f =
        std::fs::File::open(image).with_context(|| format!("opening {}", image.display()))?;
    let mut hasher = blake3::Hasher::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f
            .read(&mut buf)
            .with_context(|| format!("reading {}", image.display()))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    let got = hasher.finalize();
    if got != blake3::Hash::from_bytes(want) {
        bail!(
            "{}: its blake3 is {got}, not the {} it was received with: the image changed on \
             the data partition; nothing written",
            image.display(),
            blake3::Hash::from_bytes(want)
        );
    }
    Ok(())
}

/// Checks the first bytes of a root file system image: ext4 (magic 0xEF53 at 1080) with
/// the label `image/build` gives roots (`tessera-root`).
pub fn check_root_header(head: &[u8]) -> anyhow::Result<()> {
    if head.len() < 1160 || head[1080..1082] != [0x53, 0xef] {
        bail!("not an ext4 file system image (give image/build's tessera-root.img)");
    }
    let label = &head[1144..1160];
    let label = &label[..label.iter().position(|&b| b == 0).unwrap_or(label.len())];
    if label != b"tessera-root" {
        bail!(
            "an ext4 image labelled {:?}, not tessera-root (give image/build's tessera-root.img)",
            String::from_utf8_lossy(label)
        );
    }
    Ok(())
}

/// Writes `dir/root.img` to `to`'s partition, its kernel and initrd to the ESP and a new
/// entry with `tries` boots; returns the new release.
fn write_slot(dir: &Path, esp: &Path, to: Slot, tries: u32) -> anyhow::Result<String> {
    let img_path = dir.join("root.img");
    let link = Path::new("/dev/disk/by-partlabel").join(to.partlabel());
    let dev = std::fs::canonicalize(&link)
        .with_context(|| format!("{}: no such partition", link.display()))?;
    let name = dev
        .file_name()
        .and_then(|n| n.to_str())
        .context("the slot's device name")?;
    let sectors: u64 = std::fs::read_to_string(format!("/sys/class/block/{name}/size"))
        .context("reading the slot's size")?
        .trim()
        .parse()
        .context("the slot's size")?;
    let room = sectors * 512;
    let mut img = std::fs::File::open(&img_path)
        .with_context(|| format!("opening {}", img_path.display()))?;
    let len = img.metadata()?.len();
    if len > room {
        bail!("the new root file system is {len} bytes; slot {to} holds {room}");
    }
    let mut head = vec![0u8; 2048];
    img.read_exact(&mut head)
        .context("reading the image's first bytes")?;
    check_root_header(&head)?;

    // The slot's old entries go first: a half-written slot is never booted.
    for e in esp_entries(esp)?.iter().filter(|e| e.slot == to) {
        std::fs::remove_file(entries_dir(esp).join(&e.file))
            .with_context(|| format!("removing the old entry {}", e.file))?;
    }
    nix::unistd::sync();

    eprintln!("writing {len} bytes to {} (slot {to})", dev.display());
    let mut out = std::fs::OpenOptions::new()
        .write(true)
        .open(&dev)
        .with_context(|| format!("opening {}", dev.display()))?;
    out.write_all(&head)?;
    let mut buf = vec![0u8; 4 << 20];
    loop {
        let n = img.read(&mut buf).context("reading the image")?;
        if n == 0 {
            break;
        }
        out.write_all(&buf[..n])
            .with_context(|| format!("writing {}", dev.display()))?;
    }
    out.sync_all()
        .with_context(|| format!("syncing {}", dev.display()))?;
    drop(out);

    std::fs::create_dir_all(MOUNT_AT)?;
    let dev_s = dev.to_string_lossy().into_owned();
    run("mount", &["-t", "ext4", &dev_s, MOUNT_AT])?;
    let new_root = Path::new(MOUNT_AT);
    let copied = carry_over(Path::new("/etc"), &new_root.join("etc"))
        .and_then(|()| copy_boot_files(new_root, esp, to));
    let unmounted = run("umount", &[MOUNT_AT]);
    let release = copied?;
    unmounted?;

    let partuuid = partuuid_of(&dev)?;
    let existing = esp_entries(esp)?;
    let file = slots::new_entry_file(&existing, to, tries);
    let path = entries_dir(esp).join(&file);
    std::fs::write(&path, slots::entry_text(to, &partuuid, &release))
        .with_context(|| format!("writing {}", path.display()))?;
    nix::unistd::sync();
    eprintln!("boot entry {file}");
    Ok(release)
}

/// What makes this node itself and lives in the root file system, copied into the new
/// slot's `/etc`: the machine id (a default host name is made from it) and what the first
/// boot made of the seed (applied once: `tessera-firstboot apply` does not run again, so
/// later edits of the seed partition still change nothing).
const CARRIED: &[(&str, u32)] = &[
    ("machine-id", 0o444),
    ("hostname", 0o644),
    ("tessera/node-seed.toml", 0o600),
    ("systemd/network/10-tessera-management.network", 0o644),
    ("systemd/networkd.conf.d/10-tessera.conf", 0o644),
];

fn carry_over(from: &Path, to: &Path) -> anyhow::Result<()> {
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    for (file, mode) in CARRIED {
        let src = from.join(file);
        let Ok(bytes) = std::fs::read(&src) else {
            continue;
        };
        let dest = to.join(file);
        if let Some(dir) = dest.parent() {
            // /etc/tessera holds the join secret: 0700, as the first boot makes it.
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(if file.starts_with("tessera/") {
                    0o700
                } else {
                    0o755
                })
                .create(dir)
                .with_context(|| format!("creating {}", dir.display()))?;
        }
        crate::write_file(&dest, &String::from_utf8_lossy(&bytes), *mode)
            .with_context(|| format!("carrying {} over", src.display()))?;
        std::fs::set_permissions(&dest, std::fs::Permissions::from_mode(*mode))?;
    }
    Ok(())
}

/// The new root's kernel and initrd onto the ESP (`/tessera/<slot>/`); its release.
fn copy_boot_files(root: &Path, esp: &Path, slot: Slot) -> anyhow::Result<String> {
    let release = release_of(root);
    slots::check_release(&release).map_err(anyhow::Error::msg)?;
    let boot = root.join("boot");
    let mut kernels: Vec<String> = std::fs::read_dir(&boot)
        .with_context(|| format!("listing {}", boot.display()))?
        .filter_map(|e| e.ok())
        .filter_map(|e| e.file_name().to_str().map(str::to_string))
        .filter(|n| n.starts_with("vmlinuz-"))
        .collect();
    kernels.sort();
    let kernel = kernels
        .pop()
        .context("the new root has no /boot/vmlinuz-*")?;
    let version = &kernel["vmlinuz-".len()..];
    let initrd = format!("initrd.img-{version}");
    let dest = esp.join("tessera").join(slot.letter());
    std::fs::create_dir_all(&dest)?;
    for (from, to) in [
        (kernel.as_str(), "vmlinuz"),
        (initrd.as_str(), "initrd.img"),
    ] {
        let tmp = dest.join(format!("{to}.new"));
        std::fs::copy(boot.join(from), &tmp)
            .with_context(|| format!("copying {from} to the ESP"))?;
        std::fs::rename(&tmp, dest.join(to))?;
    }
    Ok(release)
}

/// The PARTUUID of `dev`, from the links udev makes.
fn partuuid_of(dev: &Path) -> anyhow::Result<String> {
    for e in std::fs::read_dir("/dev/disk/by-partuuid").context("listing /dev/disk/by-partuuid")? {
        let e = e?;
        if std::fs::canonicalize(e.path()).is_ok_and(|p| p == dev) {
            return Ok(e.file_name().to_string_lossy().into_owned());
        }
    }
    bail!("no PARTUUID link for {}", dev.display())
}

/// Restarts of a unit since the boot after which `boot-check` calls it unhealthy.
const MAX_RESTARTS: u32 = 5;

/// How many times systemd restarted `unit` (its `NRestarts`); 0 when unknown.
fn restarts_of(unit: &str) -> u32 {
    Command::new("systemctl")
        .args(["show", "--property=NRestarts", "--value", unit])
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(0)
}

/// `boot-check`: waits up to `within` for the node to be healthy. Healthy: exit 0 (and
/// boot-complete.target is reached: a slot on trial is blessed). Not: exit 1, and a slot on
/// trial reboots, so systemd-boot counts the failed boot.
pub fn boot_check(dir: &Path, data_dir: &Path, within: Duration) -> anyhow::Result<()> {
    let slot = match booted() {
        Ok(s) => s,
        Err(e) => {
            eprintln!("nothing to check: {e:#}");
            return Ok(());
        }
    };
    let release = release_of(Path::new("/"));
    let counted = Path::new(BOOT_COUNT_VAR).exists();
    let mut rec = read_record(dir);
    if let Some(r) = rec
        .as_mut()
        .filter(|r| matches!(r.state, UpgradeState::Rebooting | UpgradeState::Trial))
    {
        if r.to_slot == slot.letter() {
            r.state = UpgradeState::Trial;
            r.message =
                format!("running slot {slot} ({release}) on trial: waiting for it to be healthy");
        } else {
            r.state = UpgradeState::FellBack;
            r.message = format!(
                "slot {} never came back healthy in {} boot(s); running slot {slot} ({release}) again",
                r.to_slot, r.tries
            );
        }
        write_record(dir, r)?;
        eprintln!("{}", r.message);
    }
    let deadline = Instant::now() + within;
    let why = loop {
        let why = match crate::ask_status(data_dir) {
            Ok(doc) => match slots::healthy(&doc) {
                Ok(()) => break None,
                Err(w) => w,
            },
            Err(e) => format!("tesserad is not answering: {e:#}"),
        };
        // tessera-data-format.service fails on data this release cannot read: tesserad
        // then never starts, and waiting for it would only delay going back.
        let failed = ["tesserad.service", "tessera-data-format.service"]
            .into_iter()
            .find(|unit| {
                Command::new("systemctl")
                    .args(["is-failed", "--quiet", unit])
                    .status()
                    .is_ok_and(|s| s.success())
            });
        if let Some(unit) = failed {
            break Some(format!("{unit} failed ({why})"));
        }
        // A daemon that keeps exiting is not healthy either, and on a slow machine its
        // restarts may never come fast enough for systemd's start limit to fail it.
        let restarts = restarts_of("tesserad.service");
        if restarts >= MAX_RESTARTS {
            break Some(format!(
                "tesserad.service restarted {restarts} times ({why})"
            ));
        }
        if Instant::now() > deadline {
            break Some(format!("not healthy within {} s: {why}", within.as_secs()));
        }
        std::thread::sleep(Duration::from_secs(2));
    };
    let on_trial = rec.as_ref().is_some_and(|r| r.state == UpgradeState::Trial);
    match why {
        None => {
            if let Some(r) = rec.as_mut().filter(|_| on_trial) {
                r.state = UpgradeState::Good;
                r.message = format!("slot {slot} ({release}) came back healthy and is kept");
                write_record(dir, r)?;
            }
            eprintln!("healthy: slot {slot} ({release})");
            Ok(())
        }
        Some(why) => {
            if let Some(r) = rec.as_mut().filter(|_| on_trial) {
                r.message = format!("slot {slot} ({release}) on trial is not healthy: {why}");
                write_record(dir, r)?;
            }
            if counted {
                eprintln!("{why}: rebooting, so that the boot loader counts this boot as failed");
                run("systemctl", &["reboot"])?;
            }
            bail!("{why}")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_image_changed_since_its_receipt_is_not_written() {
        let dir = tempfile::tempdir().unwrap();
        let img = dir.path().join("root.img");
        std::fs::write(&img, vec![7u8; 3 << 20]).unwrap();
        let good = blake3::hash(&vec![7u8; 3 << 20]).to_hex().to_string();
        check_blake3(&img, &good).unwrap();
        let mut bytes = std::fs::read(&img).unwrap();
        bytes[2 << 20] ^= 1;
        std::fs::write(&img, &bytes).unwrap();
        let e = check_blake3(&img, &good).unwrap_err().to_string();
        assert!(e.contains("nothing written") && e.contains(&good), "{e}");
        assert!(check_blake3(&img, "not-a-hash").is_err());
    }
}
