//! The TLS client configuration this node uses to call its peers' HTTPS API (boot image
//! fetches, forwarded consoles and metrics): this node's cluster certificate, and only
//! the cluster CA trusted.

use std::path::Path;
use std::sync::Arc;

/// The configuration from `<data_dir>/tls/{node.key,node.crt,ca.crt}`; the error names
/// the file that could not be read, or why the credentials do not make a configuration.
pub fn client_config(data_dir: &Path) -> Result<Arc<rustls::ClientConfig>, String> {
    let d = data_dir.join("tls");
    let read = |f: &str| {
        std::fs::read_to_string(d.join(f)).map_err(|e| format!("reading {}/{f}: {e}", d.display()))
    };
    let creds = tessera_pki::NodeCredentials {
        key_pem: read("node.key")?,
        cert_pem: read("node.crt")?,
    };
    tessera_pki::client_config(&creds, &read("ca.crt")?)
        .map(Arc::new)
        .map_err(|e| format!("TLS client configuration: {e}"))
}
