//! The stdio hub: where the output the pod VMs' agents push
//! ([`Event::Output`]) goes, and the log buffer behind hyperd's
//! `/container/logs`.
//!
//! Every agent session hands its events to [`StdioHub::event`] on the
//! session thread, in the order the agent sent them, so one process's
//! output always precedes its exit. The hub
//! - keeps, for each process it was told to log ([`StdioHub::keep_logs`]:
//!   the containers' main processes), the most recent output in a ring of
//!   at most [`LOG_BYTES`] bytes, each chunk with its stream and the time
//!   emberd received it (the guest's clock is not trusted);
//! - forwards output to subscribers (attach, exec and `logs --follow`),
//!   each through a queue of at most [`SUB_QUEUE`] chunks. A subscriber
//!   that falls that far behind is cut off (its receiver sees the end
//!   without an exit) rather than growing emberd's memory or stalling the
//!   session, which every other stream of the pod shares;
//! - remembers exit codes (for `/exitcode`) and ends subscriptions with
//!   [`Chunk::Exit`].
//!
//! The hub never blocks: all its work is done under one short lock.
//! Logs live in emberd's memory. After an emberd restart, the session that
//! reconnects to a pod VM seeds them from the agent's own log ring
//! ([`StdioHub::seed`], the agent's LOGS request, with the guest's
//! timestamps); output events that the seed already holds are recognised by
//! their `seq` and dropped. They go with the container's pod.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender, TrySendError};
use std::sync::Mutex;
use std::time::SystemTime;

use ember_agent::Event;

/// Output bytes kept per logged process.
pub const LOG_BYTES: usize = 1024 * 1024;
/// Chunks a subscriber may lag behind before it is cut off.
pub const SUB_QUEUE: usize = 1024;
/// Exit codes remembered (oldest forgotten first).
const MAX_EXITS: usize = 4096;

/// One piece of a process's output.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Record {
    /// 1 stdout, 2 stderr.
    pub stream: u8,
    /// When emberd received it.
    pub time: SystemTime,
    /// The bytes.
    pub data: Vec<u8>,
}

/// What a subscriber receives.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Chunk {
    /// Output.
    Out(Record),
    /// The process exited with this code; nothing follows.
    Exit(i32),
}

#[derive(Default)]
struct Ring {
    records: VecDeque<Record>,
    bytes: usize,
}

impl Ring {
    fn push(&mut self, r: Record) {
        self.bytes += r.data.len();
        self.records.push_back(r);
        while self.bytes > LOG_BYTES {
            match self.records.pop_front() {
                Some(old) => self.bytes -= old.data.len(),
                None => break,
            }
        }
    }
}

#[derive(Default)]
struct Hub {
    logged: HashSet<String>,
    logs: HashMap<String, Ring>,
    subs: HashMap<String, Vec<SyncSender<Chunk>>>,
    exits: HashMap<String, i32>,
    exit_order: VecDeque<String>,
    /// Highest output `seq` a seed held, per process.
    seeded: HashMap<String, u64>,
}

/// See the module docs.
#[derive(Default)]
pub struct StdioHub {
    inner: Mutex<Hub>,
}

/// Sends to every subscriber of `id`, dropping those that are gone or too
/// far behind.
fn fan_out(subs: &mut Vec<SyncSender<Chunk>>, chunk: &Chunk) {
    subs.retain(|tx| match tx.try_send(chunk.clone()) {
        Ok(()) => true,
        Err(TrySendError::Full(_)) => {
            log::warn!("stdio: a client fell {SUB_QUEUE} chunks behind; cutting it off");
            false
        }
        Err(TrySendError::Disconnected(_)) => false,
    });
}

impl StdioHub {
    fn lock(&self) -> std::sync::MutexGuard<'_, Hub> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// From now on, keeps the output of `id` for `logs` (a fresh log: a
    /// restarted container starts a new one, and forgets its old exit).
    pub fn keep_logs(&self, id: &str) {
        let mut h = self.lock();
        h.logged.insert(id.to_string());
        h.logs.insert(id.to_string(), Ring::default());
        h.exits.remove(id);
        h.seeded.remove(id);
    }

    /// Keeps `records` (an agent's LOGS reply) as the log of `id`; live
    /// output they already hold (by `seq`) is ignored from now on.
    pub fn seed(&self, id: &str, records: &[ember_agent::protocol::LogRecord]) {
        let mut ring = Ring::default();
        let mut max = 0;
        for r in records {
            let Ok(data) = ember_agent::b64::decode(&r.data) else {
                continue;
            };
            max = max.max(r.seq);
            // 0: the agent has no clock; then the time of the seed.
            let time = match r.time_ns {
                0 => SystemTime::now(),
                ns => SystemTime::UNIX_EPOCH + std::time::Duration::from_nanos(ns),
            };
            ring.push(Record {
                stream: r.stream,
                time,
                data,
            });
        }
        let mut h = self.lock();
        h.logged.insert(id.to_string());
        h.logs.insert(id.to_string(), ring);
        h.seeded.insert(id.to_string(), max);
    }

    /// Forgets everything about `id` (its container was removed); its
    /// subscribers see the end.
    pub fn forget(&self, id: &str) {
        let mut h = self.lock();
        h.logged.remove(id);
        h.logs.remove(id);
        h.subs.remove(id);
        h.exits.remove(id);
        h.seeded.remove(id);
    }

    /// An event from an agent session (see the module docs).
    pub fn event(&self, ev: &Event) {
        let mut h = self.lock();
        match ev {
            Event::Output {
                id,
                stream,
                data,
                seq,
            } => {
                if *seq != 0 && h.seeded.get(id).is_some_and(|max| seq <= max) {
                    return;
                }
                let data = match ember_agent::b64::decode(data) {
                    Ok(d) => d,
                    Err(e) => {
                        log::warn!("stdio: bad output data for {id} from an agent: {e}");
                        return;
                    }
                };
                let rec = Record {
                    stream: *stream,
                    time: SystemTime::now(),
                    data,
                };
                if let Some(subs) = h.subs.get_mut(id) {
                    fan_out(subs, &Chunk::Out(rec.clone()));
                }
                if h.logged.contains(id) {
                    h.logs.entry(id.clone()).or_default().push(rec);
                }
            }
            Event::Exited { id, code } => {
                if let Some(mut subs) = h.subs.remove(id) {
                    fan_out(&mut subs, &Chunk::Exit(*code));
                }
                if h.exits.insert(id.clone(), *code).is_none() {
                    h.exit_order.push_back(id.clone());
                    while h.exit_order.len() > MAX_EXITS {
                        if let Some(old) = h.exit_order.pop_front() {
                            h.exits.remove(&old);
                        }
                    }
                }
            }
        }
    }

    /// Live output of `id` from now on (and its exit).
    pub fn subscribe(&self, id: &str) -> Receiver<Chunk> {
        let (tx, rx) = sync_channel(SUB_QUEUE);
        self.lock().subs.entry(id.to_string()).or_default().push(tx);
        rx
    }

    /// The kept log of `id` as lines (a record split after each `\n`; a
    /// line written in several pieces stays several), of the selected
    /// streams, the last `tail` of them if given; and, with `follow` and
    /// while `id` has not exited, a subscription that continues exactly
    /// where the log ends.
    pub fn logs(
        &self,
        id: &str,
        streams: (bool, bool),
        tail: Option<usize>,
        follow: bool,
    ) -> (Vec<Record>, Option<Receiver<Chunk>>) {
        let mut h = self.lock();
        let wanted = |r: &&Record| (r.stream == 1 && streams.0) || (r.stream == 2 && streams.1);
        let mut records: Vec<Record> = h
            .logs
            .get(id)
            .map(|ring| {
                ring.records
                    .iter()
                    .filter(wanted)
                    .flat_map(|r| {
                        r.data.split_inclusive(|b| *b == b'\n').map(|l| Record {
                            stream: r.stream,
                            time: r.time,
                            data: l.to_vec(),
                        })
                    })
                    .collect()
            })
            .unwrap_or_default();
        if let Some(n) = tail {
            let skip = records.len().saturating_sub(n);
            records.drain(..skip);
        }
        let sub = (follow && !h.exits.contains_key(id)).then(|| {
            let (tx, rx) = sync_channel(SUB_QUEUE);
            h.subs.entry(id.to_string()).or_default().push(tx);
            rx
        });
        (records, sub)
    }

    /// The exit code of `id`, once it has exited.
    pub fn exit_code(&self, id: &str) -> Option<i32> {
        self.lock().exits.get(id).copied()
    }
}

/// Docker's multiplexed stream frame (`stdcopy`): stream byte, three zero
/// bytes, big-endian u32 length, then the data.
pub fn stdcopy_frame(stream: u8, data: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(8 + data.len());
    out.push(stream);
    out.extend_from_slice(&[0, 0, 0]);
    out.extend_from_slice(&(data.len() as u32).to_be_bytes());
    out.extend_from_slice(data);
    out
}

/// Docker's log timestamp (`logger.TimeFormat`, RFC 3339 with nanoseconds,
/// UTC), as hyperd put before each log line with `timestamps`.
pub fn timestamp(t: SystemTime) -> String {
    let d = t.duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default();
    let dt = time::OffsetDateTime::from_unix_timestamp_nanos(d.as_nanos() as i128)
        .unwrap_or(time::OffsetDateTime::UNIX_EPOCH);
    format!(
        "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}.{:09}Z",
        dt.year(),
        u8::from(dt.month()),
        dt.day(),
        dt.hour(),
        dt.minute(),
        dt.second(),
        dt.nanosecond()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn out(id: &str, stream: u8, s: &str) -> Event {
        Event::Output {
            id: id.into(),
            stream,
            data: ember_agent::b64::encode(s.as_bytes()),
            seq: 0,
        }
    }

    fn text(r: &[Record]) -> Vec<(u8, String)> {
        r.iter()
            .map(|r| (r.stream, String::from_utf8_lossy(&r.data).into_owned()))
            .collect()
    }

    #[test]
    fn logs_tail_selection_follow_and_exit() {
        let hub = StdioHub::default();
        hub.keep_logs("c1");
        hub.event(&out("c1", 1, "a\n"));
        hub.event(&out("c1", 2, "b\n"));
        hub.event(&out("c1", 1, "c\nc2\n"));
        // Output of a process nobody logs is only forwarded.
        hub.event(&out("e1", 1, "x\n"));
        let (all, sub) = hub.logs("c1", (true, true), None, false);
        assert_eq!(
            text(&all),
            [
                (1, "a\n".into()),
                (2, "b\n".into()),
                (1, "c\n".into()),
                (1, "c2\n".into())
            ]
        );
        assert!(sub.is_none());
        let (only_out, _) = hub.logs("c1", (true, false), Some(2), false);
        assert_eq!(text(&only_out), [(1, "c\n".into()), (1, "c2\n".into())]);
        let (only_err, _) = hub.logs("c1", (false, true), None, false);
        assert_eq!(text(&only_err), [(2, "b\n".into())]);
        let (none, _) = hub.logs("e1", (true, true), None, false);
        assert!(none.is_empty());

        // Follow continues exactly after the history, then ends with the exit.
        let (_, sub) = hub.logs("c1", (true, true), Some(0), true);
        let sub = sub.unwrap();
        let live = hub.subscribe("c1");
        hub.event(&out("c1", 2, "d\n"));
        hub.event(&Event::Exited {
            id: "c1".into(),
            code: 3,
        });
        for rx in [sub, live] {
            let got: Vec<Chunk> = rx.iter().collect();
            assert_eq!(got.len(), 2, "{got:?}");
            assert!(matches!(&got[0], Chunk::Out(r) if r.data == b"d\n" && r.stream == 2));
            assert_eq!(got[1], Chunk::Exit(3));
        }
        assert_eq!(hub.exit_code("c1"), Some(3));
        // After the exit, follow gives the log only.
        assert!(hub.logs("c1", (true, true), None, true).1.is_none());
        // A restart starts a fresh log and forgets the exit.
        hub.keep_logs("c1");
        assert_eq!(hub.exit_code("c1"), None);
        assert!(hub.logs("c1", (true, true), None, false).0.is_empty());
    }

    #[test]
    fn the_log_is_bounded_and_slow_subscribers_are_cut_off() {
        let hub = StdioHub::default();
        hub.keep_logs("c");
        let slow = hub.subscribe("c");
        let big = "x".repeat(64 * 1024);
        for _ in 0..(SUB_QUEUE + 10) {
            hub.event(&out("c", 1, &big));
        }
        let (recs, _) = hub.logs("c", (true, true), None, false);
        let bytes: usize = recs.iter().map(|r| r.data.len()).sum();
        assert!(bytes <= LOG_BYTES, "{bytes}");
        assert_eq!(bytes, LOG_BYTES, "whole chunks, newest kept");
        // The slow one got SUB_QUEUE chunks, then the end without an exit.
        assert_eq!(slow.iter().count(), SUB_QUEUE);
    }

    #[test]
    fn a_seed_from_the_agent_and_no_duplicates() {
        use ember_agent::protocol::LogRecord;
        let hub = StdioHub::default();
        let rec = |seq: u64, s: &str| LogRecord {
            seq,
            stream: 1,
            time_ns: 1_000_000_000 * seq,
            data: ember_agent::b64::encode(s.as_bytes()),
        };
        hub.seed("c", &[rec(1, "one\n"), rec(2, "two\n")]);
        // Seq 2 was in the seed (sent before the LOGS reply); 3 is new.
        for (seq, s) in [(2, "two\n"), (3, "three\n")] {
            hub.event(&Event::Output {
                id: "c".into(),
                stream: 1,
                data: ember_agent::b64::encode(s.as_bytes()),
                seq,
            });
        }
        let (recs, _) = hub.logs("c", (true, true), None, false);
        assert_eq!(
            text(&recs),
            [
                (1, "one\n".into()),
                (1, "two\n".into()),
                (1, "three\n".into())
            ]
        );
        assert_eq!(
            recs[0].time,
            SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(1)
        );
    }

    #[test]
    fn frames_and_timestamps() {
        assert_eq!(
            stdcopy_frame(2, b"hi"),
            [2, 0, 0, 0, 0, 0, 0, 2, b'h', b'i']
        );
        let t = SystemTime::UNIX_EPOCH + std::time::Duration::new(1_600_000_000, 5);
        assert_eq!(timestamp(t), "2020-09-13T12:26:40.000000005Z");
    }
}
