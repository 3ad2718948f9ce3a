//! `ferry site`: the gateway's identity and peers.

use super::output::{self, Output};
use super::Connect;
use crate::api::types::SiteInfo;

pub async fn run(connect: &Connect, out: Output) -> anyhow::Result<()> {
    let site: SiteInfo = connect.client()?.get("/v1/site").await?;
    if out == Output::Json {
        return output::json(&site);
    }
    println!("site         {}", site.name);
    println!("version      {}", site.version);
    println!("fingerprint  {}", site.fingerprint);
    println!("api          {}", site.api);
    println!("peer link    {}", site.peer_listen);
    for p in &site.peers {
        println!("peer         {} {} {}", p.name, p.address, p.fingerprint);
    }
    Ok(())
}
