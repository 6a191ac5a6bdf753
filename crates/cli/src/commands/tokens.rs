//! API tokens: created with a role and a lifetime, revoked by id.

use tessera_api::{NewToken, TokenInfo};

use crate::args::TokenCmd;
use crate::client::Client;
use crate::endpoints::{TOKEN_CREATE, TOKEN_RM};
use crate::output::{opt, word, Output};

pub fn run(client: &Client, cmd: TokenCmd, out: Output) -> anyhow::Result<()> {
    match cmd {
        TokenCmd::Create { role, expires } => {
            let v = client.send(
                TOKEN_CREATE,
                &[],
                &NewToken {
                    role,
                    expires_in_s: expires,
                },
            )?;
            out.show(TOKEN_CREATE, &v, |t: TokenInfo| {
                println!("id:    {}", t.id);
                println!("token: {}", opt(&t.token));
                println!("role:  {}", word(&t.role));
            })?;
        }
        TokenCmd::Rm { id } => {
            let v = client.call(TOKEN_RM, &[&id], None)?;
            out.print(&v, |_| println!("revoked {id}"));
        }
    }
    Ok(())
}
