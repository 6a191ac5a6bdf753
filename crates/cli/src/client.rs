//! The HTTPS client of the API: one agent that trusts the cluster CA, the bearer token,
//! and errors that say what to do next.

use anyhow::{bail, Context};
use serde::de::DeserializeOwned;
use serde::Serialize;
use serde_json::Value;

use crate::endpoints::{fill, Ep};

pub struct Client {
    api: String,
    token: Option<String>,
    agent: ureq::Agent,
    /// The TLS configuration of the agent, for connections it does not make (WebSocket).
    tls: Option<std::sync::Arc<rustls::ClientConfig>>,
}

impl Client {
    /// A client of the API at `api`, checking its certificate against `ca_pem` when given
    /// (else against the system's usual roots, which will not know a cluster's own CA).
    pub fn new(api: String, token: Option<String>, ca_pem: Option<&str>) -> anyhow::Result<Self> {
        let tls = ca_pem.map(tls_config).transpose()?.map(std::sync::Arc::new);
        Ok(Client {
            api,
            token,
            agent: agent(tls.clone()),
            tls,
        })
    }

    /// The bearer token, if logged in.
    pub fn token(&self) -> Option<&str> {
        self.token.as_deref()
    }

    /// The TLS configuration trusting the cluster CA, if one was given.
    pub fn tls(&self) -> Option<std::sync::Arc<rustls::ClientConfig>> {
        self.tls.clone()
    }

    /// The same API and CA, without the token (logging in must not send an old one).
    pub fn anonymous(&self) -> Client {
        Client {
            api: self.api.clone(),
            token: None,
            agent: self.agent.clone(),
            tls: self.tls.clone(),
        }
    }

    /// The same token and CA for the API at `api` (another node's).
    pub fn at(&self, api: String) -> Client {
        Client {
            api,
            token: self.token.clone(),
            agent: self.agent.clone(),
            tls: self.tls.clone(),
        }
    }

    pub fn api(&self) -> &str {
        &self.api
    }

    /// A request to `ep` with its path parameters and `query` (`""` or `?a=b`).
    pub fn request(&self, ep: Ep, params: &[&str], query: &str) -> (String, ureq::Request) {
        let path = fill(ep.1, params);
        let url = format!("{}{path}{query}", self.api.trim_end_matches('/'));
        let mut req = self.agent.request(ep.0, &url);
        if let Some(t) = &self.token {
            req = req.set("Authorization", &format!("Bearer {t}"));
        }
        (path, req)
    }

    pub fn call(&self, ep: Ep, params: &[&str], body: Option<Value>) -> anyhow::Result<Value> {
        self.call_q(ep, params, "", body)
    }

    /// Calls `ep` with `body` (an API request type) as its JSON body.
    pub fn send(&self, ep: Ep, params: &[&str], body: &impl Serialize) -> anyhow::Result<Value> {
        let body = serde_json::to_value(body).context("encoding the request")?;
        self.call(ep, params, Some(body))
    }

    /// Calls `ep` and reads the answer as `T` (for code that needs the answer itself,
    /// not only to show it).
    pub fn get<T: DeserializeOwned>(&self, ep: Ep, params: &[&str]) -> anyhow::Result<T> {
        decode(ep, &self.call(ep, params, None)?)
    }

    pub fn call_q(
        &self,
        ep: Ep,
        params: &[&str],
        query: &str,
        body: Option<Value>,
    ) -> anyhow::Result<Value> {
        let (path, req) = self.request(ep, params, query);
        let (method, url) = (ep.0, format!("{}{path}", self.api));
        let req = req.timeout(std::time::Duration::from_secs(30));
        let res = match body {
            Some(b) => req.send_json(b),
            None => req.call(),
        };
        match res {
            Ok(r) => Ok(r.into_json().unwrap_or(Value::Null)),
            Err(ureq::Error::Status(code, r)) => {
                let v: Value = r.into_json().unwrap_or(Value::Null);
                let msg = v["error"].as_str().unwrap_or("no details").to_string();
                let hint = if code == 401 {
                    " (log in with `tessera login`)"
                } else {
                    ""
                };
                Err(CallFailed::Status {
                    code,
                    text: format!("{method} {path}: HTTP {code}: {msg}{hint}"),
                }
                .into())
            }
            Err(e) => {
                let hint = if e.to_string().contains("certificate") {
                    " (is --ca-file the cluster's CA, a node's <data_dir>/tls/ca.crt?)"
                } else {
                    ""
                };
                Err(CallFailed::NoAnswer(format!("{method} {url}: {e}{hint}")).into())
            }
        }
    }
}

/// A call that got no answer to use: the API's HTTP status with its words, or no answer
/// at all (no connection, a timeout, TLS). Typed so that a caller can tell a node that is
/// not ready or not reachable (ask again) from a refusal; shown as its words.
#[derive(Debug)]
pub enum CallFailed {
    Status { code: u16, text: String },
    NoAnswer(String),
}

impl CallFailed {
    /// The HTTP status, or `None` for no answer at all.
    pub fn status(&self) -> Option<u16> {
        match self {
            CallFailed::Status { code, .. } => Some(*code),
            CallFailed::NoAnswer(_) => None,
        }
    }
}

impl std::fmt::Display for CallFailed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CallFailed::Status { text, .. } | CallFailed::NoAnswer(text) => f.write_str(text),
        }
    }
}

impl std::error::Error for CallFailed {}

/// Reads an answer of `ep` as its API type.
pub fn decode<T: DeserializeOwned>(ep: Ep, v: &Value) -> anyhow::Result<T> {
    T::deserialize(v).with_context(|| format!("{} {}: unexpected answer", ep.0, ep.1))
}

/// An HTTP agent that trusts only the cluster CA (`tls`) when given.
fn agent(tls: Option<std::sync::Arc<rustls::ClientConfig>>) -> ureq::Agent {
    match tls {
        None => ureq::AgentBuilder::new().build(),
        Some(config) => ureq::AgentBuilder::new().tls_config(config).build(),
    }
}

/// A TLS client configuration that trusts only the CA certificate(s) in `pem`.
fn tls_config(pem: &str) -> anyhow::Result<rustls::ClientConfig> {
    use rustls_pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    for c in rustls_pki_types::CertificateDer::pem_slice_iter(pem.as_bytes()) {
        roots
            .add(c.context("reading the CA certificate")?)
            .context("using the CA certificate")?;
    }
    if roots.is_empty() {
        bail!("no certificate in the CA file");
    }
    Ok(
        rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth(),
    )
}
