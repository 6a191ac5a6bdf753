//! Logging in and out, and changing one's own password.

use anyhow::Context;
use tessera_api::{Login, LoginReply, PasswordChange};

use crate::client::{decode, Client};
use crate::credentials::{Credentials, Settings};
use crate::endpoints::{LOGIN, LOGOUT, PASSWORD};
use crate::output::Output;
use crate::prompt::Secrets;

/// Logs in as `user` and remembers the token, the API address and the CA. When the
/// server answers that the user needs a second factor, its code is asked for (prompted on
/// a terminal, else the next line of standard input) and the login sent again with it.
pub fn login(client: &Client, settings: &Settings, user: &str, out: Output) -> anyhow::Result<()> {
    let secrets = Secrets::detect();
    let password = secrets.read("password")?;
    let mut login = Login {
        username: user.to_string(),
        password,
        totp: None,
    };
    let anonymous = client.anonymous();
    let v = match try_login(&anonymous, &login)? {
        Ok(v) => v,
        Err(()) => {
            login.totp = Some(secrets.read("second factor (authenticator code or recovery code)")?);
            anonymous.send(LOGIN, &[], &login)?
        }
    };
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

/// One login attempt: the answer, `Err(())` when the server asks for a second factor
/// (401 with `"second_factor"`), or the error of any other refusal.
fn try_login(client: &Client, login: &Login) -> anyhow::Result<Result<serde_json::Value, ()>> {
    let (_, req) = client.request(LOGIN, &[], "");
    let body = serde_json::to_value(login).context("encoding the request")?;
    match req
        .timeout(std::time::Duration::from_secs(30))
        .send_json(body)
    {
        Ok(r) => Ok(Ok(r.into_json().unwrap_or(serde_json::Value::Null))),
        Err(ureq::Error::Status(code, r)) => {
            let v: serde_json::Value = r.into_json().unwrap_or(serde_json::Value::Null);
            if code == 401 && v.get("second_factor").is_some() {
                return Ok(Err(()));
            }
            let msg = v["error"].as_str().unwrap_or("no details");
            anyhow::bail!("{} {}: HTTP {code}: {msg}", LOGIN.0, LOGIN.1)
        }
        Err(e) => anyhow::bail!("{} {}{}: {e}", LOGIN.0, client.api(), LOGIN.1),
    }
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
