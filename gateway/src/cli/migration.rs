//! `ferry migration`: list and inspect migrations.

use super::output::{self, Output};
use super::Connect;
use crate::migration::Migration;

#[derive(Debug, clap::Subcommand)]
pub enum Cmd {
    /// List this site's migrations (outgoing and incoming).
    Ls,
    /// Show one migration with its phase timings.
    Show {
        id: String,
        /// Also draw its phases on a time axis, with bytes on the wire, into this SVG file.
        #[arg(long, value_name = "FILE.svg")]
        timeline: Option<std::path::PathBuf>,
    },
    /// Follow a migration until it ends: a progress line (phase, bytes sent, rate) on a
    /// terminal, plain lines otherwise; with --output json, one JSON event per line (the
    /// last one, `"event":"end"`, holds the final record).
    Watch { id: String },
    /// Abort a migration this site drives: before the destination was asked to run the
    /// workload it rolls back and the source runs on; after that it is refused (only the
    /// destination's word can end it then).
    Abort { id: String },
}

pub async fn run(cmd: Cmd, connect: &Connect, out: Output) -> anyhow::Result<()> {
    let client = connect.client()?;
    match cmd {
        Cmd::Ls => {
            let list: Vec<Migration> = client.get("/v1/migrations").await?;
            if out == Output::Json {
                return output::json(&list);
            }
            output::table(
                &[
                    "ID", "WORKLOAD", "ROLE", "FROM", "TO", "PHASE", "DOWNTIME", "TOTAL", "ERROR",
                ],
                list.iter()
                    .map(|m| {
                        vec![
                            m.id.clone(),
                            m.workload.clone(),
                            format!("{:?}", m.role).to_lowercase(),
                            m.source.clone(),
                            m.target.clone(),
                            m.phase.to_string(),
                            ms(m.timings.freeze_ms),
                            ms(m.timings.total_ms),
                            output::opt(m.error.as_ref()),
                        ]
                    })
                    .collect(),
            );
            Ok(())
        }
        Cmd::Watch { id } => {
            let m = follow(&client, &id, out).await?;
            if out == Output::Text {
                print_migration(&m);
            }
            Ok(())
        }
        Cmd::Abort { id } => {
            let m: Migration = client.delete(&format!("/v1/migrations/{id}")).await?;
            if out == Output::Json {
                return output::json(&m);
            }
            println!(
                "migration {} ({}): abort requested in phase {}; it rolls back at its next step (`ferry migration show {}`)",
                m.id, m.workload, m.phase, m.id
            );
            Ok(())
        }
        Cmd::Show { id, timeline } => {
            let m: Migration = client.get(&format!("/v1/migrations/{id}")).await?;
            if let Some(path) = &timeline {
                std::fs::write(path, super::timeline::svg(&m)).map_err(|e| {
                    anyhow::anyhow!("cannot write the timeline to {}: {e}", path.display())
                })?;
            }
            if out == Output::Json {
                return output::json(&m);
            }
            print_migration(&m);
            if let Some(path) = &timeline {
                println!("timeline    {}", path.display());
            }
            Ok(())
        }
    }
}

/// Follows migration `id` through its events until it ends; returns its final record.
/// Text: a progress line on a terminal (plain lines when stderr is not one); JSON: each
/// event on its own line on stdout.
pub async fn follow(
    client: &crate::api::client::ApiClient,
    id: &str,
    out: Output,
) -> anyhow::Result<Migration> {
    use crate::api::types::MigrationEvent;
    let mut events = client.events(id).await?;
    let bar = output::spinner();
    let mut last_phase = String::new();
    let mut last_line = std::time::Instant::now();
    let end = loop {
        let Some((event, data)) = events.next().await? else {
            break None;
        };
        if out == Output::Json {
            println!(
                "{{\"event\":{},\"data\":{data}}}",
                serde_json::to_string(&event)?
            );
        }
        match event.as_str() {
            "progress" => {
                let Ok(e) = serde_json::from_str::<MigrationEvent>(&data) else {
                    continue;
                };
                let of = e.expected_bytes.map_or_else(String::new, |x| {
                    format!(
                        " ({:.1} of ~{:.1} MB of image)",
                        e.bytes_read as f64 / 1e6,
                        x as f64 / 1e6
                    )
                });
                let eta = e
                    .eta_ms
                    .map_or_else(String::new, |ms| format!(", ETA {:.1} s", ms as f64 / 1e3));
                let line = format!(
                    "{}: {}, {:.1} MB sent{of}, {:.0} Mbit/s{eta}",
                    e.workload,
                    e.phase,
                    e.bytes_sent as f64 / 1e6,
                    e.rate_mbit_s
                );
                if bar.is_hidden()
                    && out == Output::Text
                    && (e.phase != last_phase || last_line.elapsed().as_secs() >= 1)
                {
                    eprintln!("{line}");
                    last_line = std::time::Instant::now();
                }
                last_phase = e.phase;
                if let Some(expected) = e.expected_bytes.filter(|x| *x > 0) {
                    output::as_bar(&bar, expected);
                    bar.set_position(e.bytes_read.min(expected));
                }
                bar.set_message(line);
            }
            "end" => break serde_json::from_str::<Migration>(&data).ok(),
            _ => {}
        }
    };
    bar.finish_and_clear();
    match end {
        Some(m) => Ok(m),
        // The stream ended early (the gateway restarted): the record as it is now.
        None => Ok(client.get(&format!("/v1/migrations/{id}")).await?),
    }
}

/// ", in N ms" when known.
fn ms_label(v: Option<u64>) -> String {
    v.map_or_else(String::new, |v| format!(", in {v} ms"))
}

fn ms(v: Option<u64>) -> String {
    v.map_or_else(|| "-".into(), |v| format!("{v} ms"))
}

/// Human summary of a migration, with its phase timings.
pub fn print_migration(m: &Migration) {
    println!("migration   {}", m.id);
    println!("workload    {} ({} -> {})", m.workload, m.source, m.target);
    println!("phase       {}", m.phase);
    if let Some(a) = &m.approach {
        println!("approach    {a}");
    }
    if let Some(p) = &m.plan {
        println!("why         {p}");
    }
    if let Some(d) = &m.destination {
        println!("runs as     {} at {}", d.runtime, m.target);
    }
    if let Some(since) = m.stalled_since_ms {
        let secs = crate::spec::now_ms().saturating_sub(since) / 1000;
        println!("STALLED     for {secs} s past the site's bound (migration.stall_after_secs): the destination is silent");
    }
    if let Some(e) = &m.error {
        println!("reason      {e}");
    }
    let t = &m.timings;
    if t.prepare_ms.is_some() {
        println!(
            "prepare     {}   (before the freeze, clients served: destination prepared, volumes and pages sent ahead)",
            ms(t.prepare_ms)
        );
    }
    println!(
        "downtime    {}   (checkpoint start -> destination confirmed)",
        ms(t.freeze_ms)
    );
    if t.sync_ms.is_some() {
        println!(
            "  sync      {}   (before the switch; clients served)",
            ms(t.sync_ms)
        );
    }
    println!("  dump      {}", ms(t.dump_ms));
    if t.volume_delta_ms.is_some() {
        println!(
            "  volumes   {}   (beside the transfer)",
            ms(t.volume_delta_ms)
        );
    }
    println!("  transfer  {}", ms(t.transfer_ms));
    println!("  restore   {}", ms(t.restore_ms));
    if t.postcopy_ms.is_some() {
        println!(
            "post-copy   {}   (destination running, pages still coming from the source)",
            ms(t.postcopy_ms)
        );
    }
    if let Some(p) = &m.pages {
        let us =
            |v: Option<u64>| v.map_or_else(|| "-".into(), |v| format!("{:.1} ms", v as f64 / 1e3));
        println!(
            "pages       {} sent ahead ({} written before the freeze){}",
            p.ahead,
            p.stale,
            ms_label(t.prepush_ms)
        );
        if p.requests > 0 || p.pushed > 0 {
            println!(
                "            {} pushed after the switch; {} requests of the lazy-pages daemon: {} from the cache, {} waited for the source (p50 {}, p99 {})",
                p.pushed, p.requests, p.hits, p.waits, us(p.wait_p50_us), us(p.wait_p99_us)
            );
        }
    }
    if let Some(v) = &m.volumes {
        let pass = |name: &str, p: &crate::checkpoint::volume::VolumeSync| {
            println!(
                "{name}{} files, {} bytes: {} read, {} sent ({} on the wire) in {} ms",
                p.files, p.bytes, p.read_bytes, p.sent_bytes, p.wire_bytes, p.ms
            );
        };
        if let Some(p) = &v.precopy {
            pass("volumes     while running: ", p);
        }
        if let Some(p) = &v.delta {
            pass("            while frozen:  ", p);
        }
        if let Some(w) = v.written_bytes {
            println!("volumes     {w} bytes written here before the restore");
        }
    }
    println!("total       {}", ms(t.total_ms));
    if m.bytes_on_wire > 0 {
        println!(
            "moved       {} bytes in {} files, {} bytes on the wire",
            m.bytes_moved, m.files, m.bytes_on_wire
        );
    } else {
        println!("moved       {} bytes in {} files", m.bytes_moved, m.files);
    }
    if m.bytes_deduped > 0 {
        println!(
            "warm        {} bytes of pages the destination held went as their digests",
            m.bytes_deduped
        );
    }
}
