//! A migration's progress as server-sent events: `GET /v1/migrations/{id}/events` streams
//! `progress` events (phase, bytes sent so far, rate, the record's counters) when something
//! changed, at most every 100 ms and at least every second, then one `end` event with the
//! final record once the migration has ended (an `error` event if it is no longer recorded).

use std::convert::Infallible;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use hyper::body::{Bytes, Frame};
use tokio::sync::mpsc;

use super::types::{ErrorBody, MigrationEvent};
use crate::migration::{Engine, Phase};

/// How often the record is looked at.
const TICK: Duration = Duration::from_millis(100);
/// Longest quiet time between two events (the client sees the stream is alive).
const HEARTBEAT: Duration = Duration::from_secs(1);
/// Window the rate is measured over (the ticks of the last half second).
const RATE_WINDOW: Duration = Duration::from_millis(500);

/// A response body fed by a channel: each message is one chunk.
pub struct ChannelBody(mpsc::Receiver<Bytes>);

impl hyper::body::Body for ChannelBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        self.0
            .poll_recv(cx)
            .map(|chunk| chunk.map(|b| Ok(Frame::data(b))))
    }
}

/// The rate from `from` to `to` in Mbit/s (0 over less than a tick).
fn rate_mbit_s(from: Option<(Instant, u64)>, to: (Instant, u64)) -> f64 {
    let Some((at, bytes)) = from else {
        return 0.0;
    };
    let secs = to.0.duration_since(at).as_secs_f64();
    if secs < TICK.as_secs_f64() / 2.0 {
        return 0.0;
    }
    to.1.saturating_sub(bytes) as f64 * 8.0 / secs / 1e6
}

/// Time left until `expected` bytes of the image are read and sent at `rate_mbit_s` (the
/// rate they are read at), while the move is sending (none before the rate is known or
/// once it stopped sending).
fn eta_ms(expected: Option<u64>, read: u64, rate_mbit_s: f64, phase: Phase) -> Option<u64> {
    let sending = matches!(
        phase,
        Phase::Preparing | Phase::Checkpointing | Phase::Transferring | Phase::Paging
    );
    if !sending || rate_mbit_s < 1.0 {
        return None;
    }
    let left = expected?.saturating_sub(read) as f64 * 8.0 / 1e6;
    Some((left / rate_mbit_s * 1000.0).round() as u64)
}

fn sse(event: &str, data: &str) -> Bytes {
    Bytes::from(format!("event: {event}\ndata: {data}\n\n"))
}

/// Starts following migration `id` of `engine`; the body streams its events.
pub fn follow(engine: Arc<Engine>, id: String) -> ChannelBody {
    let (tx, rx) = mpsc::channel(16);
    tokio::spawn(async move {
        let started = Instant::now();
        let expected = match engine.get(&id) {
            Some(m) => engine.expected_bytes(&m).await,
            None => None,
        };
        let mut last: Option<(String, u64, Option<String>)> = None;
        let mut last_sent_at = Instant::now();
        // (when, bytes sent, bytes of the image read) of the ticks of the last
        // RATE_WINDOW, oldest first.
        let mut samples: std::collections::VecDeque<(Instant, u64, u64)> =
            std::collections::VecDeque::new();
        loop {
            let Some(m) = engine.get(&id) else {
                let gone = ErrorBody {
                    code: "not_found".into(),
                    message: format!("migration {id} is no longer recorded on this site"),
                };
                let data = serde_json::to_string(&gone).unwrap_or_default();
                let _ = tx.send(sse("error", &data)).await;
                return;
            };
            let (wire_now, read_now) = engine.sending_now(&id);
            let sent = m.bytes_on_wire + wire_now;
            let read = m.bytes_moved + read_now;
            let now = Instant::now();
            samples.push_back((now, sent, read));
            while samples.len() > 2 && samples[1].0 + RATE_WINDOW <= now {
                samples.pop_front();
            }
            let oldest = samples.front().copied();
            let rate = rate_mbit_s(oldest.map(|(at, s, _)| (at, s)), (now, sent));
            let read_rate = rate_mbit_s(oldest.map(|(at, _, r)| (at, r)), (now, read));
            let key = (m.phase.to_string(), sent, m.error.clone());
            if last.as_ref() != Some(&key) || last_sent_at.elapsed() >= HEARTBEAT {
                let event = MigrationEvent {
                    id: m.id.clone(),
                    workload: m.workload.clone(),
                    phase: m.phase.to_string(),
                    elapsed_ms: u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX),
                    bytes_sent: sent,
                    rate_mbit_s: (rate * 10.0).round() / 10.0,
                    bytes_read: read,
                    expected_bytes: expected,
                    eta_ms: eta_ms(expected, read, read_rate, m.phase),
                    bytes_moved: m.bytes_moved,
                    bytes_deduped: m.bytes_deduped,
                    pages: m.pages.clone(),
                    error: m.error.clone(),
                };
                let data = serde_json::to_string(&event).unwrap_or_default();
                if tx.send(sse("progress", &data)).await.is_err() {
                    return; // the client went away
                }
                last = Some(key);
                last_sent_at = Instant::now();
            }
            if m.phase.is_terminal() {
                let data = serde_json::to_string(&m).unwrap_or_default();
                let _ = tx.send(sse("end", &data)).await;
                return;
            }
            tokio::time::sleep(TICK).await;
        }
    });
    ChannelBody(rx)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_eta_is_what_is_left_at_the_current_rate_while_sending() {
        // 100 MB left at 800 Mbit/s: 1 s.
        assert_eq!(
            eta_ms(Some(150_000_000), 50_000_000, 800.0, Phase::Transferring),
            Some(1000)
        );
        assert_eq!(
            eta_ms(Some(10), 50, 800.0, Phase::Checkpointing),
            Some(0),
            "more sent than expected (framing): nothing left"
        );
        assert_eq!(eta_ms(None, 0, 800.0, Phase::Transferring), None);
        assert_eq!(eta_ms(Some(10), 0, 0.0, Phase::Transferring), None);
        assert_eq!(eta_ms(Some(10), 0, 800.0, Phase::Restoring), None);
    }

    #[test]
    fn the_rate_is_over_the_samples_span_and_nothing_under_a_tick() {
        let t0 = Instant::now();
        let later = t0 + Duration::from_millis(200);
        // 2.5 MB in 200 ms: 100 Mbit/s.
        let r = rate_mbit_s(Some((t0, 0)), (later, 2_500_000));
        assert!((r - 100.0).abs() < 0.01, "{r}");
        assert_eq!(rate_mbit_s(Some((t0, 0)), (t0, 5)), 0.0);
        assert_eq!(rate_mbit_s(None, (later, 5)), 0.0);
    }
}
