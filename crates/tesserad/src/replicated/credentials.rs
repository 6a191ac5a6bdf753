//! This node's TLS credentials (`<data_dir>/tls/`): loaded, minted by the founding node
//! with the cluster CA, or issued by a member on enrollment; each file written whole,
//! readable by root only.

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use anyhow::Context;
use tessera_cluster::identity::NodeId;
use tessera_pki::{ClusterCa, NodeCredentials};
use tessera_state::network::Tls;

use super::{raft_addr, raft_id, Peers};

/// This node's TLS credentials: `<data_dir>/tls/{node.key,node.crt,ca.crt}`.
pub(super) fn tls_dir(data_dir: &Path) -> std::path::PathBuf {
    data_dir.join("tls")
}

/// Loads this node's certificate, key and the cluster CA certificate, if it has them.
pub fn load_tls(data_dir: &Path) -> anyhow::Result<Option<Tls>> {
    let d = tls_dir(data_dir);
    let read = |f: &str| std::fs::read_to_string(d.join(f));
    match (read("node.key"), read("node.crt"), read("ca.crt")) {
        (Ok(key_pem), Ok(cert_pem), Ok(ca)) => {
            let creds = NodeCredentials { key_pem, cert_pem };
            Ok(Some(Tls::new(&creds, &ca).with_context(|| {
                format!("the TLS credentials in {} are unusable", d.display())
            })?))
        }
        _ => Ok(None),
    }
}

/// The HTTPS configuration of this node's API, from its stored credentials.
pub fn api_tls(data_dir: &Path) -> anyhow::Result<rustls::ServerConfig> {
    let d = tls_dir(data_dir);
    let read = |f: &str| {
        std::fs::read_to_string(d.join(f)).with_context(|| format!("reading {}/{f}", d.display()))
    };
    let creds = NodeCredentials {
        key_pem: read("node.key")?,
        cert_pem: read("node.crt")?,
    };
    Ok(tessera_pki::api_server_config(&creds)?)
}

/// Stores credentials, each file written whole.
fn save_tls(data_dir: &Path, creds: &NodeCredentials, ca_pem: &str) -> anyhow::Result<Tls> {
    let d = tls_dir(data_dir);
    std::fs::create_dir_all(&d).with_context(|| format!("creating {}", d.display()))?;
    // Certificates are public; the key is not. All are written 0600: nothing else needs
    // to read them.
    write_private(&d.join("node.key"), &creds.key_pem)?;
    write_private(&d.join("node.crt"), &creds.cert_pem)?;
    write_private(&d.join("ca.crt"), ca_pem)?;
    Ok(Tls::new(creds, ca_pem)?)
}

/// The founding node's part: mints the cluster CA and certifies itself with it.
pub fn mint(
    data_dir: &Path,
    cluster_id: &str,
    me: &NodeId,
    ips: &[std::net::IpAddr],
) -> anyhow::Result<(ClusterCa, Tls)> {
    let ca = ClusterCa::mint(cluster_id)?;
    let name = tessera_state::network::cert_name(raft_id(me)?);
    let (key_pem, csr) = tessera_pki::node_key_and_request(&name)?;
    let creds = NodeCredentials {
        cert_pem: ca.issue_with_ips(&csr, &name, ips)?,
        key_pem,
    };
    let tls = save_tls(data_dir, &creds, &ca.cert_pem)?;
    // Kept until the CA is in the replicated state, so a crash right after formation
    // does not lose it (see `minted_ca`).
    write_private(&tls_dir(data_dir).join("ca.key"), &ca.key_pem)?;
    Ok((ca, tls))
}

fn write_private(path: &Path, text: &str) -> anyhow::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)
        .with_context(|| format!("writing {}", tmp.display()))?;
    f.write_all(text.as_bytes())?;
    f.sync_all()?;
    std::fs::rename(&tmp, path)?;
    Ok(())
}

/// The CA this node minted, if it did (the founding node, after a restart).
pub fn minted_ca(data_dir: &Path) -> Option<ClusterCa> {
    let d = tls_dir(data_dir);
    Some(ClusterCa {
        cert_pem: std::fs::read_to_string(d.join("ca.crt")).ok()?,
        key_pem: std::fs::read_to_string(d.join("ca.key")).ok()?,
    })
}

/// Gets a certificate from a member of the cluster (any of `peers`, management
/// addresses, as they become known), retrying until one issues it.
pub async fn enroll(
    me: &NodeId,
    data_dir: &Path,
    key: [u8; 32],
    peers: &Peers,
    ips: &[std::net::IpAddr],
) -> anyhow::Result<Tls> {
    let my_raft_id = raft_id(me)?;
    let mut last = String::from("no member heard yet");
    for attempt in 0u32.. {
        let candidates: Vec<SocketAddr> = peers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .copied()
            .collect();
        for a in candidates {
            let addr = raft_addr(a).to_string();
            match tessera_state::network::enroll(&addr, &key, my_raft_id, ips).await {
                Ok((creds, ca_pem)) => {
                    tracing::info!(%addr, "received this node's cluster certificate");
                    return save_tls(data_dir, &creds, &ca_pem);
                }
                // Asking again cannot help: the caller stops as a removed node.
                Err(e) if crate::removed::says_removed(&e.to_string()) => {
                    anyhow::bail!("enrollment refused: {e}")
                }
                Err(e) => last = e.to_string(),
            }
        }
        if attempt % 20 == 19 {
            tracing::warn!(error = %last, "still waiting for a member to issue this node's certificate");
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    anyhow::bail!("could not enroll: {last}")
}
