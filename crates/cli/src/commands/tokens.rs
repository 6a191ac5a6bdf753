//! API tokens: created with a role and a lifetime, revoked by id.

use serde_json::json;

use crate::args::TokenCmd;
use crate::client::Client;
use crate::endpoints::{TOKEN_CREATE, TOKEN_RM};
use crate::output::Output;

pub fn run(client: &Client, cmd: TokenCmd, out: Output) -> anyhow::Result<()> {
    match cmd {
        TokenCmd::Create { role, expires } => {
            let v = client.call(
                TOKEN_CREATE,
                &[],
                Some(json!({ "role": role, "expires_in_s": expires })),
            )?;
            out.print(&v, |v| {
                println!("id:    {}", v["id"].as_str().unwrap_or("-"));
                println!("token: {}", v["token"].as_str().unwrap_or("-"));
                println!("role:  {}", v["role"].as_str().unwrap_or("-"));
            });
        }
        TokenCmd::Rm { id } => {
            let v = client.call(TOKEN_RM, &[&id], None)?;
            out.print(&v, |_| println!("revoked {id}"));
        }
    }
    Ok(())
}
