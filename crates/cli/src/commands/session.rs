//! Logging in and out, and changing one's own password.

use tessera_api::{Login, LoginReply, PasswordChange};

use crate::client::{decode, Client};
use crate::credentials::{Credentials, Settings};
use crate::endpoints::{LOGIN, LOGOUT, PASSWORD};
use crate::output::Output;
use crate::prompt::Secrets;

/// Logs in as `user` and remembers the token, the API address and the CA.
pub fn login(client: &Client, settings: &Settings, user: &str, out: Output) -> anyhow::Result<()> {
    let password = Secrets::detect().read("password")?;
    let v = client.anonymous().send(
        LOGIN,
        &[],
        &Login {
            username: user.to_string(),
            password,
            totp: None,
        },
    )?;
    let reply: LoginReply = decode(LOGIN, &v)?;
    Credentials {
        api: Some(client.api().to_string()),
        token: Some(reply.token.clone()),
        ca_pem: settings.ca_pem.clone(),
    }
    .save()?;
    out.print(&v, |_| {
        println!("logged in to {}", client.api());
        if reply.must_change_password {
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
    let old_password = secrets.read("old password")?;
    let new_password = secrets.read_new("new password")?;
    let v = client.send(
        PASSWORD,
        &[],
        &PasswordChange {
            old_password,
            new_password,
        },
    )?;
    out.print(&v, |_| println!("password changed"));
    Ok(())
}
