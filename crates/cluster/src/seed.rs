//! The seed configuration a node boots with (`/etc/tessera/seed.toml` or the image's
//! config partition): which cluster to form or join, with which secret, how many nodes.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::Deserialize;

/// A field that is missing or wrong, named.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SeedError {
    /// The file could not be read.
    #[error("reading {path}: {reason}")]
    Read {
        /// File.
        path: String,
        /// Why.
        reason: String,
    },
    /// TOML syntax, unknown field or wrong type (the message names the field).
    #[error("{path}: {reason}")]
    Parse {
        /// File.
        path: String,
        /// Why (from the TOML parser, naming the field).
        reason: String,
    },
    /// A value out of range.
    #[error("{path}: field `{field}`: {reason}")]
    Invalid {
        /// File.
        path: String,
        /// The field.
        field: &'static str,
        /// Why.
        reason: String,
    },
}

/// The management network settings.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Management {
    /// The address this node's cluster traffic and API bind to.
    pub address: SocketAddr,
    /// Interface for multicast discovery (optional; the kernel picks one otherwise).
    #[serde(default)]
    pub interface: Option<String>,
    /// Multicast group and port for discovery announcements.
    #[serde(default = "default_multicast")]
    pub multicast: SocketAddr,
    /// Where the REST API listens (default: the management address, port 8006).
    #[serde(default)]
    pub api: Option<SocketAddr>,
    /// Announce by multicast (default). Off, nodes only announce to `static_peers` and
    /// listen on the management address itself (several nodes can then share a host,
    /// e.g. on 127.0.0.x).
    #[serde(default = "yes")]
    pub use_multicast: bool,
}

fn yes() -> bool {
    true
}

impl Management {
    /// The REST API's address.
    pub fn api_address(&self) -> SocketAddr {
        self.api
            .unwrap_or_else(|| SocketAddr::new(self.address.ip(), 8006))
    }
}

fn default_multicast() -> SocketAddr {
    SocketAddr::from(([239, 77, 0, 1], 7946))
}

/// The seed configuration.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Seed {
    /// Cluster name: nodes only talk to announcements with the same name.
    pub cluster_name: String,
    /// The name this node goes by in the API and the CLI (default: the machine's host
    /// name). Nodes that share a host need one each to be told apart.
    #[serde(default)]
    pub node_name: Option<String>,
    /// Shared join secret (at least 16 characters): authenticates every discovery message.
    pub join_secret: String,
    /// How many nodes must see each other before the cluster forms.
    pub expected_nodes: usize,
    /// Management network.
    pub management: Management,
    /// Where this node keeps its state.
    pub data_dir: PathBuf,
    /// Peers to announce to directly, for networks without multicast.
    #[serde(default)]
    pub static_peers: Vec<SocketAddr>,
    /// This node's block store.
    #[serde(default)]
    pub storage: Storage,
}

/// Where this node's `tessera-store` takes orders and serves volumes.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Storage {
    /// The store's admin socket.
    #[serde(default = "default_admin_socket")]
    pub admin_socket: PathBuf,
    /// The store's NBD TCP address, as clients reach it (shown in volume records).
    #[serde(default)]
    pub nbd: Option<SocketAddr>,
}

impl Default for Storage {
    fn default() -> Self {
        Storage {
            admin_socket: default_admin_socket(),
            nbd: None,
        }
    }
}

fn default_admin_socket() -> PathBuf {
    PathBuf::from("/var/lib/tessera/store/admin.sock")
}

impl Seed {
    /// Reads and validates a seed file.
    pub fn load(path: &Path) -> Result<Seed, SeedError> {
        let p = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|e| SeedError::Read {
            path: p.clone(),
            reason: e.to_string(),
        })?;
        Self::parse(&text, &p)
    }

    /// Parses and validates seed text; `origin` names it in errors.
    pub fn parse(text: &str, origin: &str) -> Result<Seed, SeedError> {
        let seed: Seed = toml::from_str(text).map_err(|e| SeedError::Parse {
            path: origin.to_string(),
            reason: match e.span().and_then(|s| field_at(text, s.start)) {
                Some(field) => format!("field `{field}`: {}", e.message()),
                None => e.message().to_string(),
            },
        })?;
        let invalid = |field, reason: &str| SeedError::Invalid {
            path: origin.to_string(),
            field,
            reason: reason.to_string(),
        };
        let name_ok = !seed.cluster_name.is_empty()
            && seed.cluster_name.len() <= 63
            && seed
                .cluster_name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-');
        if !name_ok {
            return Err(invalid("cluster_name", "1-63 letters, digits or '-'"));
        }
        let node_name_ok = seed.node_name.as_ref().is_none_or(|n| {
            !n.is_empty()
                && n.len() <= 63
                && n.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_'))
        });
        if !node_name_ok {
            return Err(invalid(
                "node_name",
                "1-63 letters, digits, '-', '.' or '_'",
            ));
        }
        if seed.join_secret.len() < 16 {
            return Err(invalid("join_secret", "must be at least 16 characters"));
        }
        if !(1..=64).contains(&seed.expected_nodes) {
            return Err(invalid("expected_nodes", "must be 1 to 64"));
        }
        if !seed.management.multicast.ip().is_multicast() {
            return Err(invalid(
                "management.multicast",
                "must be a multicast address",
            ));
        }
        if seed.management.address.ip().is_unspecified() {
            return Err(invalid(
                "management.address",
                "must be a concrete address peers can reach",
            ));
        }
        if !seed.management.use_multicast && seed.static_peers.is_empty() && seed.expected_nodes > 1
        {
            return Err(invalid(
                "static_peers",
                "needed when management.use_multicast is false",
            ));
        }
        if !seed.storage.admin_socket.is_absolute() {
            return Err(invalid("storage.admin_socket", "must be an absolute path"));
        }
        if !seed.data_dir.is_absolute() {
            return Err(invalid("data_dir", "must be an absolute path"));
        }
        Ok(seed)
    }
}

/// The dotted name of the key on the line holding byte `at` (for error messages).
fn field_at(text: &str, at: usize) -> Option<String> {
    let mut table = String::new();
    let mut start = 0;
    for line in text.split_inclusive('\n') {
        let end = start + line.len();
        let t = line.trim();
        if t.starts_with('[') && t.ends_with(']') {
            table = t.trim_matches(|c| c == '[' || c == ']').trim().to_string();
        }
        if (start..end).contains(&at) {
            let key = t.split_once('=')?.0.trim();
            return Some(if table.is_empty() {
                key.to_string()
            } else {
                format!("{table}.{key}")
            });
        }
        start = end;
    }
    None
}

/// Join secrets are to carry at least this much entropy (`tessera seed new` makes 190
/// bits); below it, a captured join message or copied state may be guessed.
pub const STRONG_SECRET_BITS: f64 = 128.0;

/// A rough upper bound of a secret's entropy in bits: its length times the bits per
/// character of the classes it uses (lower case, upper case, digits, other). Generated
/// secrets reach it; a phrase people pick reaches it too while being guessable, so this
/// only catches the clearly weak.
pub fn secret_bits(secret: &str) -> f64 {
    let has = |f: fn(char) -> bool| secret.chars().any(f);
    let mut alphabet = 0u32;
    if has(|c| c.is_ascii_lowercase()) {
        alphabet += 26;
    }
    if has(|c| c.is_ascii_uppercase()) {
        alphabet += 26;
    }
    if has(|c| c.is_ascii_digit()) {
        alphabet += 10;
    }
    if has(|c| !c.is_ascii_alphanumeric()) {
        alphabet += 33;
    }
    secret.chars().count() as f64 * f64::from(alphabet.max(1)).log2()
}

/// Why `secret` is weak, if it is (see [`secret_bits`]).
pub fn weak_secret(secret: &str) -> Option<String> {
    let bits = secret_bits(secret);
    (bits < STRONG_SECRET_BITS).then(|| {
        format!(
            "the join secret has at most {bits:.0} bits of entropy (fewer than {STRONG_SECRET_BITS:.0}): \
             anyone who captures a join or discovery message, or a copy of a node's state, may guess it; \
             make one with `tessera seed new` and put it in every node's seed"
        )
    })
}

#[cfg(test)]
mod tests {
    #[test]
    fn weak_secrets_are_told_apart_from_generated_ones() {
        assert!(super::weak_secret("hunter2").is_some());
        assert!(super::weak_secret("aaaaaaaaaaaaaaaaaaaa").is_some());
        // 32 characters of [A-Za-z0-9], as the devcluster and `tessera seed new` make.
        assert!(super::weak_secret("Xq3vT9bLm2Pz8Rk4Wn7Yc1Hd6Js5Fg0A").is_none());
    }

    use super::*;

    const GOOD: &str = r#"
cluster_name = "lab"
join_secret = "correct horse battery staple"
expected_nodes = 3
data_dir = "/var/lib/tessera"
static_peers = ["10.77.0.2:7946"]

[management]
address = "10.77.0.1:7946"
"#;

    #[test]
    fn a_good_seed_parses_with_defaults() {
        let s = Seed::parse(GOOD, "seed.toml").unwrap();
        assert_eq!(s.expected_nodes, 3);
        assert_eq!(s.management.multicast, "239.77.0.1:7946".parse().unwrap());
        assert_eq!(s.static_peers.len(), 1);
        assert_eq!(s.node_name, None);
        let named = GOOD.replace(
            "expected_nodes = 3",
            "expected_nodes = 3\nnode_name = \"node1\"",
        );
        assert_eq!(
            Seed::parse(&named, "seed.toml")
                .unwrap()
                .node_name
                .as_deref(),
            Some("node1")
        );
    }

    #[test]
    fn errors_name_the_field() {
        let cases = [
            (
                GOOD.replace("expected_nodes = 3", "expected_nodes = 0"),
                "expected_nodes",
            ),
            (
                GOOD.replace("correct horse battery staple", "short"),
                "join_secret",
            ),
            (GOOD.replace("\"lab\"", "\"bad name!\""), "cluster_name"),
            (
                GOOD.replace("expected_nodes = 3", "expected_nodes = \"three\""),
                "expected_nodes",
            ),
            (
                GOOD.replace("expected_nodes = 3", "expected_nodes = 3\nexpectd = 1"),
                "expectd",
            ),
            (GOOD.replace("/var/lib/tessera", "relative/dir"), "data_dir"),
            (
                GOOD.replace("10.77.0.1:7946", "0.0.0.0:7946"),
                "management.address",
            ),
            (GOOD.replace("cluster_name = \"lab\"\n", ""), "cluster_name"),
            (
                GOOD.replace(
                    "expected_nodes = 3",
                    "expected_nodes = 3\nnode_name = \"a b\"",
                ),
                "node_name",
            ),
            (
                GOOD.replace("expected_nodes = 3", "expected_nodes = 3\nnode_name = \"\""),
                "node_name",
            ),
        ];
        for (text, field) in cases {
            let e = Seed::parse(&text, "seed.toml").unwrap_err().to_string();
            assert!(e.contains(field), "{field}: {e}");
        }
    }
}
