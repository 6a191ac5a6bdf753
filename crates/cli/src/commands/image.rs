//! Boot images: upload (the kernel and initramfs streamed from their files, never read
//! into memory whole), list, delete.

use std::io::Read;

use anyhow::{bail, Context};
use tessera_api::{Image, MAX_IMAGE_BYTES};

use crate::args::ImageCmd;
use crate::client::Client;
use crate::endpoints::{IMAGES, IMAGE_RM, IMAGE_UPLOAD};
use crate::output::{col, opt, size, table, wide_col, Output};

pub fn run(client: &Client, cmd: ImageCmd, out: Output) -> anyhow::Result<()> {
    match cmd {
        ImageCmd::Upload {
            name,
            kernel,
            initrd,
            cmdline,
        } => {
            let open = |p: &std::path::Path| {
                let f =
                    std::fs::File::open(p).with_context(|| format!("opening {}", p.display()))?;
                let len = f.metadata()?.len();
                anyhow::Ok((f, len))
            };
            let (k, klen) = open(&kernel)?;
            if klen == 0 {
                bail!("{}: the kernel file is empty", kernel.display());
            }
            let (i, ilen): (Box<dyn Read + Send>, u64) = match &initrd {
                Some(p) => {
                    let (f, l) = open(p)?;
                    (Box::new(f), l)
                }
                None => (Box::new(std::io::empty()), 0),
            };
            if klen + ilen > MAX_IMAGE_BYTES {
                bail!(
                    "an image is at most {} (kernel and initramfs together); these are {}",
                    size(Some(MAX_IMAGE_BYTES)),
                    size(Some(klen + ilen))
                );
            }
            let (path, mut req) = client.request(IMAGE_UPLOAD, &[], "");
            req = req
                .query("name", &name)
                .query("kernel_bytes", &klen.to_string())
                .set("Content-Type", "application/octet-stream")
                .set("Content-Length", &(klen + ilen).to_string())
                .timeout(std::time::Duration::from_secs(600));
            if let Some(c) = &cmdline {
                req = req.query("cmdline", c);
            }
            let v = match req.send(k.chain(i)) {
                Ok(r) => r.into_json().unwrap_or(serde_json::Value::Null),
                Err(ureq::Error::Status(code, r)) => {
                    let v: serde_json::Value = r.into_json().unwrap_or_default();
                    let msg = v["error"].as_str().unwrap_or("no details").to_string();
                    bail!("POST {path}: HTTP {code}: {msg}")
                }
                Err(e) => bail!("POST {path}: {e}"),
            };
            out.print(&v, |_| {
                println!(
                    "uploaded image {name} ({}); every node fetches its own copy",
                    size(Some(klen + ilen))
                )
            });
        }
        ImageCmd::Ls => {
            let v = client.call(IMAGES, &[], None)?;
            out.show(IMAGES, &v, |imgs: Vec<Image>| {
                table(
                    &imgs,
                    &[
                        col("NAME", |i: &Image| i.name.clone()),
                        col("KERNEL", |i: &Image| size(Some(i.kernel.size_bytes))),
                        col("INITRD", |i: &Image| {
                            i.initrd
                                .as_ref()
                                .map_or_else(|| "-".into(), |f| size(Some(f.size_bytes)))
                        }),
                        col("COPIES", |i: &Image| i.copies.len().to_string()),
                        col("CMDLINE", |i: &Image| opt(&i.cmdline)),
                        wide_col("BLAKE3", |i: &Image| i.kernel.blake3.clone()),
                    ],
                    out.wide(),
                )
            })?;
        }
        ImageCmd::Rm { name } => {
            let v = client.call(IMAGE_RM, &[&name], None)?;
            out.print(&v, |_| println!("deleted image {name}"));
        }
    }
    Ok(())
}
