//! What `login` remembers: the API address, the session token and the cluster CA, in
//! `~/.config/tessera/credentials.json` (mode 0600), and how they combine with the
//! command line.

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::Context;
use serde::{Deserialize, Serialize};

/// Where the API is used when neither `--api` nor a login says otherwise.
const DEFAULT_API: &str = "https://127.0.0.1:8006";

/// The stored login; a field that is missing or unreadable counts as not given.
#[derive(Default, Serialize, Deserialize)]
pub struct Credentials {
    #[serde(default)]
    pub api: Option<String>,
    #[serde(default)]
    pub token: Option<String>,
    #[serde(default)]
    pub ca_pem: Option<String>,
}

impl Credentials {
    /// The stored login, or an empty one when there is none (or it cannot be read).
    pub fn load() -> Credentials {
        path()
            .ok()
            .and_then(|p| std::fs::read(p).ok())
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_default()
    }

    /// Writes the login, readable by its owner only.
    pub fn save(&self) -> anyhow::Result<()> {
        use std::os::unix::fs::OpenOptionsExt;
        let path = path()?;
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&path)?;
        f.write_all(&serde_json::to_vec(self)?)?;
        Ok(())
    }

    /// Forgets the login (nothing to forget is fine).
    pub fn remove() {
        if let Ok(p) = path() {
            let _ = std::fs::remove_file(p);
        }
    }
}

/// What this run uses: the command line first, then the stored login, then defaults.
pub struct Settings {
    pub api: String,
    pub token: Option<String>,
    pub ca_pem: Option<String>,
}

impl Settings {
    pub fn resolve(api: Option<String>, ca_file: Option<&Path>) -> anyhow::Result<Settings> {
        let saved = Credentials::load();
        let ca_pem = match ca_file {
            Some(p) => Some(
                std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))?,
            ),
            None => saved.ca_pem,
        };
        Ok(Settings {
            api: api.or(saved.api).unwrap_or_else(|| DEFAULT_API.to_string()),
            token: saved.token,
            ca_pem,
        })
    }
}

fn path() -> anyhow::Result<PathBuf> {
    let base = std::env::var_os("XDG_CONFIG_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".config")))
        .context("neither XDG_CONFIG_HOME nor HOME is set")?;
    Ok(base.join("tessera").join("credentials.json"))
}
