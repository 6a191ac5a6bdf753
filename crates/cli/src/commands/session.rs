//! Logging in and out, and changing one's own password.

use anyhow::Context;
use serde_json::json;

use crate::client::Client;
use crate::credentials::{Credentials, Settings};
use crate::endpoints::{LOGIN, LOGOUT, PASSWORD};
use crate::output::Output;
use crate::prompt::Secrets;

/// Logs in as `user` and remembers the token, the API address and the CA.
pub fn login(client: &Client, settings: &Settings, user: &str, out: Output) -> anyhow::Result<()> {
    let password = Secrets::detect().read("password")?;
    let v = client.anonymous().call(
        LOGIN,
        &[],
        Some(json!({ "username": user, "password": password })),
    )?;
    let token = v["token"]
        .as_str()
        .context("no token in the login answer")?;
    Credentials {
        api: Some(client.api().to_string()),
        token: Some(token.to_string()),
        ca_pem: settings.ca_pem.clone(),
    }
    .save()?;
    out.print(&v, |v| {
        println!("logged in to {}", client.api());
        if v["must_change_password"] == true {
            println!("the password must be changed first: tessera password");
        }
    });
    Ok(())
}

/// Ends the session on the server and forgets it here.
pub fn logout(client: &Client, out: Output) -> anyhow::Result<()> {
    let v = client.call(LOGOUT, &[], None)?;
    Credentials::remove();
    out.print(&v, |_| println!("logged out"));
    Ok(())
}

/// Changes the password: prompted on a terminal (the new one twice), else two lines of
/// standard input (old, new).
pub fn password(client: &Client, out: Output) -> anyhow::Result<()> {
    let secrets = Secrets::detect();
    let old = secrets.read("old password")?;
    let new = secrets.read_new("new password")?;
    let v = client.call(
        PASSWORD,
        &[],
        Some(json!({ "old_password": old, "new_password": new })),
    )?;
    out.print(&v, |_| println!("password changed"));
    Ok(())
}
