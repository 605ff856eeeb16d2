//! Dedup records with a bound every replica agrees on: the session table behind exactly-once.
//!
//! Why sessions expire: every clerk (every `kvctl` run, every bench client) is a new session, and a table
//! that keeps them all grows without end — in memory, in every snapshot, and for a shard group in every
//! migration (a shard's table moves with it, in pages after its keys). So a table drops sessions idle
//! longer than a TTL and, beyond a count, the least recently active ones. Both rules use only what is in
//! the log: time is the leader's clock stamped into each entry ([`LogClock`], Raft dissertation §6.3),
//! and the policy travels in the entries too, so every replica drops the same sessions at the same index
//! whatever its own flags say.
//!
//! Why dropping is safe: the table remembers the largest client id it ever dropped (`evicted_max`). A
//! command from a client it does not know whose id is not above that mark may be a retry of a command
//! applied before the session was dropped, so it is not applied; the client is told its session expired
//! ([`Lookup::Expired`]). Client ids start with the creating clerk's clock ([`crate::rsm::client::new_client_id`]),
//! so clients created after a drop have larger ids and start cleanly; an unlucky new client below the
//! mark is told to take a new id above it, which costs it one round trip and risks nothing.
//!
//! The exactly-once window: a command retried while its session is kept is answered from the table; a
//! retry after the session was dropped is refused with `SESSION_EXPIRED` — never applied a second time.
//!
//! Why a session has an owner: client ids are not secret (they start with a clock), so without one any
//! caller could send commands under another's id — a sequence number far ahead made the real client's
//! next writes look like retries, answered from the table and never applied, and a repeated one read
//! back the other's remembered output. Each record keeps the [`Owner`] of the identity that opened it
//! (stamped into the log entry by the leader from the caller's certificate); a command under a known
//! id from another identity is told its session expired, as if that id were unknown to it, and changes
//! nothing. Records with owner 0 (no TLS, or written before owners were kept) belong to whoever uses
//! them next.

use super::{ClientId, Seq};
use std::collections::{BTreeMap, BTreeSet};

/// Low bits of a client id that are random; the bits above are the creating clerk's Unix time in ms.
pub const CLIENT_ID_RANDOM_BITS: u32 = 20;

/// How far (ms) a client id's clock may be ahead of the log's before the id is refused: an id far in the
/// future, once dropped, would refuse every honest new client until the clock caught up with it.
pub const MAX_CLIENT_CLOCK_AHEAD_MS: u64 = 24 * 60 * 60 * 1000;

/// Who opened a session: a fingerprint of the caller's identity ([`owner_of`]); 0 for none.
pub type Owner = u64;

/// The [`Owner`] of a caller: the first eight bytes of the SHA-256 of its certificate's identity (a
/// `ds824://` URI), never 0; 0 without TLS, where callers have no identity to tell apart.
pub fn owner_of(principal: Option<&crate::security::Principal>) -> Owner {
    let Some(principal) = principal else { return 0 };
    let digest = ring::digest::digest(&ring::digest::SHA256, principal.uri().as_bytes());
    let mut first = [0u8; 8];
    first.copy_from_slice(&digest.as_ref()[..8]);
    u64::from_be_bytes(first).max(1)
}

/// The rules every replica applies entries by, whatever its own flags: when sessions are dropped,
/// and how many bytes the store may hold. Carried in every logged command (the proposing leader's
/// flags), so all replicas decide alike.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LogPolicy {
    /// Drop sessions idle longer than this (log time, ms); 0 never does.
    pub ttl_ms: u64,
    /// Keep at most this many sessions, dropping the least recently active; 0 means no limit.
    pub max_sessions: u64,
    /// Most bytes of keys and values the store may hold: a write that would grow it past this is
    /// refused, with nothing written (deletes and writes that shrink it always apply); 0 means no limit.
    pub quota_bytes: u64,
}

impl Default for LogPolicy {
    fn default() -> Self {
        LogPolicy {
            ttl_ms: crate::limits::DEFAULT_SESSION_TTL_MS,
            max_sessions: crate::limits::DEFAULT_MAX_SESSIONS as u64,
            quota_bytes: crate::limits::DEFAULT_QUOTA_BYTES,
        }
    }
}

impl LogPolicy {
    /// Keep every session and any number of bytes (entries written before sessions expired carry no
    /// policy).
    pub const KEEP_ALL: LogPolicy = LogPolicy {
        ttl_ms: 0,
        max_sessions: 0,
        quota_bytes: 0,
    };
}

/// The log's notion of time and of the session policy, advanced by each applied command.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LogClock {
    /// The latest leader timestamp applied (ms since the Unix epoch; 0 before any).
    pub now_ms: u64,
    /// The policy of the latest applied command.
    pub policy: Option<LogPolicy>,
}

impl LogClock {
    /// Move to an applied command's stamp. Time never goes back, even if a new leader's clock is behind.
    pub fn observe(&mut self, time_ms: u64, policy: LogPolicy) {
        self.now_ms = self.now_ms.max(time_ms);
        self.policy = Some(policy);
    }

    /// Whether `client`'s id is one an honest clerk could have made by the log's time.
    pub fn plausible(&self, client: ClientId) -> bool {
        plausible_client(client, self.now_ms)
    }
}

/// Whether `client`'s id is one an honest clerk could have made by `now_ms` (always, when no time is
/// known: 0).
pub fn plausible_client(client: ClientId, now_ms: u64) -> bool {
    now_ms == 0
        || client >> CLIENT_ID_RANDOM_BITS <= now_ms.saturating_add(MAX_CLIENT_CLOCK_AHEAD_MS)
}

/// Wall-clock time in ms since the Unix epoch (0 if the clock is before it): the time leaders stamp
/// into entries and clerks put at the top of their ids. Debug builds add [`CLOCK_SKEW_MS`].
pub fn unix_ms() -> u64 {
    let real = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64);
    #[cfg(debug_assertions)]
    let real = real.saturating_add_signed(CLOCK_SKEW_MS.load(std::sync::atomic::Ordering::Relaxed));
    real
}

/// TESTS ONLY, debug builds only: how far (ms, either way) this process's wall clock is moved from
/// the machine's. `chaos --nemesis clock` moves one node's clock without touching the machine's
/// (which the harness and every other node share) through `kvd --unsafe-clock-skew-file`. Only the
/// wall clock moves — timers and timeouts run on the monotonic clock, as they must.
#[cfg(debug_assertions)]
pub static CLOCK_SKEW_MS: std::sync::atomic::AtomicI64 = std::sync::atomic::AtomicI64::new(0);

/// One client's last command and what it returned.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SessionRecord<O> {
    /// Its sequence number.
    pub seq: Seq,
    /// The identity that opened the session (0: anyone).
    pub owner: Owner,
    /// Its output, as [`crate::rsm::StateMachine::remember`] keeps it.
    pub output: O,
    /// Log time of the client's last command.
    pub last_ms: u64,
}

/// What the table says about a client's command.
#[derive(Debug, PartialEq, Eq)]
pub enum Lookup<'a, O> {
    /// The client's last command again: here is its output.
    Repeat(&'a O),
    /// Older than the client's last command: the client gave up on it long ago.
    Stale(&'a O),
    /// The client is unknown and may have had a session that was dropped, or its id is another
    /// identity's: do not apply; it must start a new session with an id above the given one.
    Expired(ClientId),
    /// A new command: apply it and [`SessionTable::record`] the output.
    New,
}

/// The dedup table of one replicated machine (or of one shard). See the module documentation.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SessionTable<O> {
    records: BTreeMap<ClientId, SessionRecord<O>>,
    /// (last active, client) of every record: the eviction order, oldest first, ties by id.
    by_activity: BTreeSet<(u64, ClientId)>,
    evicted_max: ClientId,
}

impl<O> Default for SessionTable<O> {
    fn default() -> Self {
        SessionTable {
            records: BTreeMap::new(),
            by_activity: BTreeSet::new(),
            evicted_max: 0,
        }
    }
}

impl<O> SessionTable<O> {
    /// A table from decoded records and mark (a snapshot, a shard's final page).
    pub fn from_parts(
        records: impl IntoIterator<Item = (ClientId, SessionRecord<O>)>,
        evicted_max: ClientId,
    ) -> Self {
        let records: BTreeMap<_, _> = records.into_iter().collect();
        let by_activity = records.iter().map(|(&c, r)| (r.last_ms, c)).collect();
        SessionTable {
            records,
            by_activity,
            evicted_max,
        }
    }

    /// Sessions kept.
    pub fn len(&self) -> usize {
        self.records.len()
    }

    /// Whether no session is kept.
    pub fn is_empty(&self) -> bool {
        self.records.is_empty()
    }

    /// The largest client id ever dropped (0: none).
    pub fn evicted_max(&self) -> ClientId {
        self.evicted_max
    }

    /// The records in client order (for encoding: the order is the same on every replica).
    pub fn iter(&self) -> impl Iterator<Item = (&ClientId, &SessionRecord<O>)> {
        self.records.iter()
    }

    /// `client`'s record.
    pub fn get(&self, client: ClientId) -> Option<&SessionRecord<O>> {
        self.records.get(&client)
    }

    /// The records of clients after `after` (from the first if `None`), in client order, at most `max`
    /// of them; and whether records remain after them. How a shard's table moves to its new owner in
    /// bounded pages.
    pub fn page(
        &self,
        after: Option<ClientId>,
        max: usize,
    ) -> (Vec<(ClientId, SessionRecord<O>)>, bool)
    where
        O: Clone,
    {
        use std::ops::Bound;
        let start = after.map_or(Bound::Unbounded, Bound::Excluded);
        let mut range = self.records.range((start, Bound::Unbounded)).peekable();
        let mut page = Vec::new();
        while let Some((&client, record)) = range.next_if(|_| page.len() < max) {
            page.push((client, record.clone()));
        }
        (page, range.peek().is_some())
    }

    /// Add records that arrived in pages (a shard moving here), and the mark of the table they came
    /// from. Nothing expires here: the table is the old owner's, which applied its policy already, and
    /// the next recorded command applies this one's.
    pub fn absorb(
        &mut self,
        records: impl IntoIterator<Item = (ClientId, SessionRecord<O>)>,
        evicted_max: ClientId,
    ) {
        for (client, record) in records {
            let active = (record.last_ms, client);
            if let Some(old) = self.records.insert(client, record) {
                self.by_activity.remove(&(old.last_ms, client));
            }
            self.by_activity.insert(active);
        }
        self.evicted_max = self.evicted_max.max(evicted_max);
    }

    /// What to do with command `seq` of `client`, sent by `owner`.
    pub fn lookup(&self, client: ClientId, seq: Seq, owner: Owner) -> Lookup<'_, O> {
        match self.records.get(&client) {
            // Another identity's session: as far as this caller is concerned the id is taken and
            // gone, so it takes one above it.
            Some(r) if r.owner != 0 && r.owner != owner => {
                Lookup::Expired(self.evicted_max.max(client))
            }
            Some(r) if seq == r.seq => Lookup::Repeat(&r.output),
            Some(r) if seq < r.seq => Lookup::Stale(&r.output),
            Some(_) => Lookup::New,
            None if client <= self.evicted_max => Lookup::Expired(self.evicted_max),
            None => Lookup::New,
        }
    }

    /// Remember `client`'s command `seq`, sent by `owner`, and its output, then drop what the clock's
    /// policy says to.
    pub fn record(
        &mut self,
        client: ClientId,
        seq: Seq,
        owner: Owner,
        output: O,
        clock: &LogClock,
    ) {
        let last_ms = clock.now_ms;
        if let Some(old) = self.records.insert(
            client,
            SessionRecord {
                seq,
                owner,
                output,
                last_ms,
            },
        ) {
            self.by_activity.remove(&(old.last_ms, client));
        }
        self.by_activity.insert((last_ms, client));
        self.expire(clock);
    }

    /// Drop the sessions the clock's policy no longer keeps: idle past the TTL, then the least recently
    /// active beyond the count.
    pub fn expire(&mut self, clock: &LogClock) {
        let Some(policy) = clock.policy else { return };
        let idle_before = clock.now_ms.saturating_sub(policy.ttl_ms);
        while let Some(&(last_ms, client)) = self.by_activity.first() {
            let too_old = policy.ttl_ms > 0 && last_ms < idle_before;
            let too_many =
                policy.max_sessions > 0 && self.records.len() as u64 > policy.max_sessions;
            if !(too_old || too_many) {
                break;
            }
            self.by_activity.pop_first();
            self.records.remove(&client);
            self.evicted_max = self.evicted_max.max(client);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn clock(now_ms: u64, ttl_ms: u64, max_sessions: u64) -> LogClock {
        LogClock {
            now_ms,
            policy: Some(LogPolicy {
                ttl_ms,
                max_sessions,
                quota_bytes: 0,
            }),
        }
    }

    #[test]
    fn the_least_recently_active_go_first_and_cannot_come_back() {
        let mut table = SessionTable::default();
        for (client, at) in [(10u64, 1u64), (20, 2), (30, 3)] {
            table.record(client, 1, 0, "out", &clock(at, 0, 2));
        }
        assert_eq!(table.len(), 2);
        assert_eq!(
            table.lookup(10, 1, 0),
            Lookup::Expired(10),
            "dropped: a retry is refused"
        );
        assert_eq!(table.lookup(20, 1, 0), Lookup::Repeat(&"out"));
        assert_eq!(table.lookup(20, 2, 0), Lookup::New);
        assert_eq!(table.lookup(5, 1, 0), Lookup::Expired(10), "below the mark");
        assert_eq!(table.lookup(11, 1, 0), Lookup::New, "above the mark");
        // Activity moves a session to the back of the line.
        table.record(20, 2, 0, "again", &clock(4, 0, 2));
        table.record(40, 1, 0, "out", &clock(5, 0, 2));
        assert!(table.get(20).is_some());
        assert_eq!(table.lookup(30, 1, 0), Lookup::Expired(30));
    }

    #[test]
    fn idle_sessions_expire_by_log_time() {
        let mut table = SessionTable::default();
        table.record(1, 1, 0, (), &clock(1_000, 500, 0));
        table.record(2, 1, 0, (), &clock(1_400, 500, 0));
        table.record(3, 1, 0, (), &clock(1_600, 500, 0));
        assert!(table.get(1).is_none());
        assert!(table.get(2).is_some());
        // Without a policy (entries from before sessions expired) nothing goes.
        table.expire(&LogClock {
            now_ms: 1_000_000,
            policy: None,
        });
        assert_eq!(table.len(), 2);
        let rebuilt = SessionTable::from_parts(
            table.iter().map(|(&c, r)| (c, r.clone())),
            table.evicted_max(),
        );
        assert_eq!(rebuilt, table);
    }

    #[test]
    fn a_table_moved_page_by_page_arrives_whole() {
        let mut table = SessionTable::default();
        for client in 1..=10u64 {
            table.record(client * 3, client, client, client, &clock(client, 0, 8));
        }
        let mut moved = SessionTable::default();
        let mut after = None;
        let mut pages = 0;
        loop {
            let (records, more) = table.page(after, 3);
            assert!(records.len() <= 3 && !records.is_empty());
            assert!(records.iter().all(|(c, _)| after.is_none_or(|a| *c > a)));
            after = records.last().map(|(c, _)| *c);
            moved.absorb(records, if more { 0 } else { table.evicted_max() });
            pages += 1;
            if !more {
                break;
            }
        }
        assert_eq!(pages, 3, "8 records, 3 a page");
        assert_eq!(moved, table);
        assert_eq!(table.page(Some(30), 3), (Vec::new(), false));
        assert_eq!(table.page(None, 0), (Vec::new(), true));
    }

    #[test]
    fn a_session_answers_only_the_identity_that_opened_it() {
        let mut table = SessionTable::default();
        table.record(7, 3, 100, "mine", &clock(1, 0, 0));
        assert_eq!(table.lookup(7, 3, 100), Lookup::Repeat(&"mine"));
        assert_eq!(table.lookup(7, 4, 100), Lookup::New);
        // Another identity gets neither the output nor a way to move the sequence on.
        for seq in [2, 3, 4, u64::MAX] {
            assert_eq!(table.lookup(7, seq, 200), Lookup::Expired(7), "seq {seq}");
        }
        assert_eq!(
            table.lookup(7, 4, 0),
            Lookup::Expired(7),
            "nor a caller without one"
        );
        // A record without an owner (no TLS, or an older version's) is anyone's.
        table.record(8, 1, 0, "open", &clock(2, 0, 0));
        assert_eq!(table.lookup(8, 1, 200), Lookup::Repeat(&"open"));
        assert_ne!(
            owner_of(None),
            owner_of(Some(
                &crate::security::Principal::parse_uri("ds824://c/client/a").expect("uri")
            ))
        );
    }

    #[test]
    fn ids_from_far_in_the_future_are_implausible() {
        let clock = clock(1_000, 0, 0);
        assert!(clock.plausible(1_000 << CLIENT_ID_RANDOM_BITS));
        assert!(!clock.plausible(u64::MAX));
        assert!(LogClock::default().plausible(u64::MAX));
    }
}
