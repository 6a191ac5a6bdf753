//! Volumes, snapshots and clones: each change is a task, followed to its end with a
//! progress bar unless `--no-wait`.

use std::io::IsTerminal;

use tessera_api::{
    NbdCredentials, NewClone, NewOverride, NewSnapshot, NewVolume, VolumeResize, VolumeView,
};

use crate::args::VolumeCmd;
use crate::client::Client;
use crate::endpoints::{
    CLONE, NBD_CREDS, SNAPSHOT_CREATE, SNAPSHOT_RM, VOLUME, VOLUMES, VOLUME_CREATE,
    VOLUME_OVERRIDE, VOLUME_RESIZE, VOLUME_RM,
};
use crate::node_names::NodeNames;
use crate::output::{col, opt, size, table, wide_col, word, Output};

use super::nodes::resolve;
use super::tasks::{done, follow};

pub fn run(client: &Client, cmd: VolumeCmd, out: Output) -> anyhow::Result<()> {
    let bar = std::io::stderr().is_terminal();
    match cmd {
        VolumeCmd::Create {
            name,
            size,
            node,
            replicas,
            no_wait,
        } => {
            let node = node.map(|n| resolve(client, &n)).transpose()?;
            let v = client.send(
                VOLUME_CREATE,
                &[],
                &NewVolume {
                    name,
                    size_bytes: size,
                    node,
                    replicas,
                },
            )?;
            out.print(&follow(client, v, no_wait, bar)?, done);
        }
        VolumeCmd::Ls => {
            let v = client.call(VOLUMES, &[], None)?;
            if out.is_json() {
                out.print(&v, |_| {});
                return Ok(());
            }
            let names = NodeNames::fetch(client)?;
            out.show(VOLUMES, &v, |vols: Vec<VolumeView>| {
                table(
                    &vols,
                    &[
                        col("NAME", |v: &VolumeView| v.volume.name.clone()),
                        col("SIZE", |v: &VolumeView| size(Some(v.volume.size_bytes))),
                        col("STATE", |v: &VolumeView| word(&v.volume.state)),
                        col("NODE", |v: &VolumeView| names.name(&v.volume.node)),
                        col("COPIES", |v: &VolumeView| {
                            let r = &v.replication;
                            let in_sync = r
                                .copies
                                .iter()
                                .filter(|c| c.state == tessera_api::CopyState::InSync)
                                .count();
                            format!("{in_sync}/{}", r.replicas)
                        }),
                        wide_col("NODE ID", |v: &VolumeView| v.volume.node.clone()),
                        col("ORIGIN", |v: &VolumeView| opt(&v.volume.origin)),
                        col("VM", |v: &VolumeView| opt(&v.attached_to)),
                        col("NBD", |v: &VolumeView| opt(&v.volume.nbd)),
                    ],
                    out.wide(),
                )
            })?;
        }
        VolumeCmd::Show { name } => {
            let v = client.call(VOLUME, &[&name], None)?;
            if out.is_json() {
                out.print(&v, |_| {});
                return Ok(());
            }
            let names = NodeNames::fetch(client)?;
            out.show(VOLUME, &v, |v: VolumeView| {
                let line = |label: &str, value: String| println!("{label:<12} {value}");
                line("name", v.volume.name.clone());
                line("size", size(Some(v.volume.size_bytes)));
                line("state", word(&v.volume.state));
                line("node", names.name(&v.volume.node));
                if out.wide() {
                    line("node id", v.volume.node.clone());
                }
                line("origin", opt(&v.volume.origin));
                line("attached_to", opt(&v.attached_to));
                line("nbd", opt(&v.volume.nbd));
                let r = &v.replication;
                line("replicas", r.replicas.to_string());
                line("primary", names.name(&r.primary));
                line("generation", r.generation.to_string());
                for c in &r.copies {
                    let progress = c
                        .catch_up
                        .map(|p| format!(" ({} of {})", size(Some(p.done)), size(Some(p.total))))
                        .unwrap_or_default();
                    let role = if c.node == r.primary {
                        "primary"
                    } else {
                        "replica"
                    };
                    line(
                        "copy",
                        format!(
                            "{} {role} {}{progress}",
                            names.name(&c.node),
                            word(&c.state)
                        ),
                    );
                }
                for s in &v.snapshots {
                    line("snapshot", format!("{} ({})", s.name, word(&s.state)));
                }
            })?;
        }
        VolumeCmd::Snapshot {
            volume,
            snapshot,
            no_wait,
        } => {
            let v = client.send(SNAPSHOT_CREATE, &[&volume], &NewSnapshot { name: snapshot })?;
            out.print(&follow(client, v, no_wait, bar)?, done);
        }
        VolumeCmd::SnapshotRm {
            volume,
            snapshot,
            no_wait,
        } => {
            let v = client.call(SNAPSHOT_RM, &[&volume, &snapshot], None)?;
            out.print(&follow(client, v, no_wait, bar)?, done);
        }
        VolumeCmd::Clone {
            volume,
            snapshot,
            name,
            no_wait,
        } => {
            let v = client.send(CLONE, &[&volume], &NewClone { snapshot, name })?;
            out.print(&follow(client, v, no_wait, bar)?, done);
        }
        VolumeCmd::Override { name, reason } => {
            let v = client.send(VOLUME_OVERRIDE, &[&name], &NewOverride { reason })?;
            out.show(VOLUME_OVERRIDE, &v, |v: VolumeView| {
                let r = &v.replication;
                let in_sync = r
                    .copies
                    .iter()
                    .filter(|c| c.state == tessera_api::CopyState::InSync)
                    .count();
                println!(
                    "override recorded for volume {}: {in_sync} of {} copies in sync, generation {}",
                    v.volume.name, r.replicas, r.generation
                );
            })?;
        }
        VolumeCmd::Resize {
            name,
            size,
            no_wait,
        } => {
            let v = client.send(VOLUME_RESIZE, &[&name], &VolumeResize { size_bytes: size })?;
            out.print(&follow(client, v, no_wait, bar)?, done);
        }
        VolumeCmd::Rm { name, no_wait } => {
            let v = client.call(VOLUME_RM, &[&name], None)?;
            out.print(&follow(client, v, no_wait, bar)?, done);
        }
        VolumeCmd::Cp(a) => super::volume_cp::run(Some(client), a, out)?,
        VolumeCmd::ExportCreds { dir } => {
            let v = client.call(NBD_CREDS, &[], None)?;
            let creds: NbdCredentials = crate::client::decode(NBD_CREDS, &v)?;
            write_creds(&dir, &creds)?;
            if out.is_json() {
                out.print(
                    &serde_json::json!({
                        "dir": dir.display().to_string(),
                        "user": creds.user,
                        "valid_days": creds.valid_days,
                    }),
                    |_| {},
                );
                return Ok(());
            }
            let d = dir.display();
            println!(
                "NBD client credentials for {} (valid {} days) written to {d}",
                creds.user, creds.valid_days
            );
            println!("  nbdinfo 'nbds://HOST:10809/VOLUME?tls-certificates={d}'");
            println!(
                "  qemu-img info --object tls-creds-x509,id=tls0,dir={d},endpoint=client \\\n      --image-opts driver=nbd,host=HOST,port=10809,export=VOLUME,tls-creds=tls0"
            );
        }
    }
    Ok(())
}

/// Writes the credentials as libnbd and qemu expect them, the key readable by its owner
/// only (and the directory private too: the key opens every volume).
fn write_creds(dir: &std::path::Path, c: &NbdCredentials) -> anyhow::Result<()> {
    use anyhow::Context;
    use std::io::Write;
    use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .with_context(|| format!("creating {}", dir.display()))?;
    for (name, text) in [
        ("ca-cert.pem", &c.ca_cert_pem),
        ("client-cert.pem", &c.client_cert_pem),
        ("client-key.pem", &c.client_key_pem),
    ] {
        let path = dir.join(name);
        let tmp = dir.join(format!(".{name}.tmp"));
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)
            .with_context(|| format!("writing {}", tmp.display()))?;
        // A leftover temporary file may have been created wider.
        f.set_permissions(std::fs::Permissions::from_mode(0o600))?;
        f.write_all(text.as_bytes())
            .with_context(|| format!("writing {}", tmp.display()))?;
        std::fs::rename(&tmp, &path).with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}
