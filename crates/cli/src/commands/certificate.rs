//! The API and console's own certificate: install one from PEM files, show what is
//! served, remove it (back to the cluster CA's certificates).

use std::path::Path;

use anyhow::Context;
use tessera_api::{CertificateStatus, NewCertificate};

use crate::args::CertificateCmd;
use crate::client::Client;
use crate::endpoints::{CERTIFICATE, CERTIFICATE_INSTALL, CERTIFICATE_RM};
use crate::output::Output;

fn human(s: CertificateStatus) {
    let Some(c) = s.installed else {
        println!("no certificate installed: every node serves its cluster-CA certificate");
        return;
    };
    println!("subject:   {}", c.subject);
    println!("issuer:    {}", c.issuer);
    println!("names:     {}", c.names.join(", "));
    println!("not after: {} (unix seconds)", c.not_after_s);
    println!("sha256:    {}", c.sha256);
    println!("chain:     {} certificate(s)", c.chain_len);
    println!("installed: by {}", c.installed_by);
}

fn read(path: &Path, what: &str) -> anyhow::Result<String> {
    std::fs::read_to_string(path).with_context(|| format!("reading the {what} {}", path.display()))
}

pub fn run(client: &Client, cmd: CertificateCmd, out: Output) -> anyhow::Result<()> {
    match cmd {
        CertificateCmd::Install { cert, key } => {
            let body = NewCertificate {
                cert_pem: read(&cert, "certificate chain")?,
                key_pem: read(&key, "private key")?,
            };
            let v = client.send(CERTIFICATE_INSTALL, &[], &body)?;
            out.show(CERTIFICATE_INSTALL, &v, human)
        }
        CertificateCmd::Show => {
            let v = client.call(CERTIFICATE, &[], None)?;
            out.show(CERTIFICATE, &v, human)
        }
        CertificateCmd::Remove => {
            let v = client.call(CERTIFICATE_RM, &[], None)?;
            out.show(CERTIFICATE_RM, &v, human)
        }
    }
}
