//! The size policy: every limit on what a client, a peer or a migration may make the system hold or send,
//! in one place, so the layers cannot drift apart (a value one layer accepts and the next cannot carry
//! is how a group wedges for good).
//!
//! How the numbers hang together, smallest first:
//!
//! - a **key** is at most [`MAX_KEY_BYTES`] and a **value** at most [`MAX_VALUE_BYTES`] — including the
//!   value an `Append` would produce (refused at apply, on every replica alike);
//! - a **client request or answer** is at most [`MAX_CLIENT_MESSAGE_BYTES`]: one key and one value with
//!   room to spare, so every accepted value can be read back;
//! - a **remembered output** (the dedup record of a client's last command) holds a value of at most
//!   [`MAX_REMEMBERED_VALUE_BYTES`]; a failed compare-and-swap on a longer value remembers only that it
//!   failed, so dedup tables stay small however large values are;
//! - a **session table** holds at most [`MAX_SESSIONS`] clients (per table: a KV cluster's, or one shard's);
//! - a **shard transfer page** carries about [`PAGE_BYTES`]: first the shard's keys and values (at least
//!   one whole key, so a page of keys is at most `PAGE_BYTES + MAX_KEY_BYTES + MAX_VALUE_BYTES`), then,
//!   once the keys are done, its dedup records by client id, as many as the rest of the page holds at
//!   [`MAX_SESSION_RECORD_BYTES`] each — a page of records alone holds [`SESSION_PAGE_RECORDS`]. So a page
//!   is at most [`MAX_PAGE_BYTES`] however many sessions the shard has (versions before session pages
//!   sent the whole table on the final page; such a page still fits one entry);
//! - a **log entry** is at most [`MAX_ENTRY_BYTES`], which holds the largest page; a proposal over it is
//!   refused, never appended;
//! - a **peer message** is at most [`MAX_PEER_MESSAGE_BYTES`], twice the entry limit, so any entry fits in an
//!   AppendEntries with its envelope.
//!
//! Compile-time assertions below check these relations, so raising one limit without the others fails
//! the build rather than a production group.

/// Longest key accepted, in bytes.
pub const MAX_KEY_BYTES: usize = 4 << 10;

/// Longest value accepted, in bytes: of a put, of a compare-and-swap's values, and of the value an
/// append would produce.
pub const MAX_VALUE_BYTES: usize = 1 << 20;

/// Largest client request or answer on the wire (`kv.Kv`, `ctrler.Ctrler`): a key and a value plus
/// framing, with room to spare.
pub const MAX_CLIENT_MESSAGE_BYTES: usize = 4 << 20;

/// Longest value a dedup record keeps (a failed compare-and-swap's current value). Longer values are
/// elided from the record: a retry is told the swap failed, not what the value was.
pub const MAX_REMEMBERED_VALUE_BYTES: usize = 64;

/// Largest encoded dedup record: client id, sequence number, time, owner, and a remembered output.
pub const MAX_SESSION_RECORD_BYTES: usize = 128;

/// Most client sessions one dedup table keeps; beyond it the least recently active are dropped (their
/// clients are told `SESSION_EXPIRED`, never applied twice). An upper bound for `--max-sessions`.
pub const MAX_SESSIONS: usize = 100_000;

/// Sessions kept by default (`--max-sessions`).
pub const DEFAULT_MAX_SESSIONS: usize = 50_000;

/// Bytes of keys and values a store (a KV cluster, a shard group) holds at most by default
/// (`--quota-bytes`), as etcd's `--quota-backend-bytes`: every replica holds them all in memory and in
/// every snapshot, so a store that grows without end takes its nodes down; at the quota, writes that
/// would grow it are refused, and deletes still apply.
pub const DEFAULT_QUOTA_BYTES: u64 = 2 << 30;

/// How long an idle session is kept by default (`--session-ttl`), in milliseconds of log time.
pub const DEFAULT_SESSION_TTL_MS: u64 = 60 * 60 * 1000;

/// Bytes of keys and values, then of dedup records, per page of a shard in transfer.
pub const PAGE_BYTES: usize = 1 << 20;

/// Most dedup records in one page of a shard in transfer: a page of records is at most [`PAGE_BYTES`],
/// so a shard with [`MAX_SESSIONS`] sessions moves its table in bounded pages, not in one message.
pub const SESSION_PAGE_RECORDS: usize = PAGE_BYTES / MAX_SESSION_RECORD_BYTES;

/// Requests one client connection may have in flight at a server (HTTP/2 streams the server lets
/// it open); more wait in the client.
pub const MAX_REQUESTS_PER_CONNECTION: u32 = 256;

/// Longest a server waits for a connection's TLS handshake (`security::serve`): one that sends
/// nothing, or trickles its handshake, is closed then. (Unbounded, as under tonic's TLS, every such
/// connection held a socket and a task for good, so anyone who could reach a port could exhaust the
/// server's file descriptors without a certificate.)
pub const TLS_HANDSHAKE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// TLS handshakes a server lets one IP address (an IPv6 /64) have under way on one port, and never
/// more than an eighth of the port's connection bound: a connection beyond it is closed at once. A handshake holds one of the port's [`MAX_CONNECTIONS_PER_LISTENER`] slots,
/// certificate or not, for up to [`TLS_HANDSHAKE_TIMEOUT`]: without this one host could hold them
/// all. Clients behind one address (a NAT, a `kvctl bench` of
/// hundreds of clients) that open more at once have the rest closed, and retry.
pub const MAX_HANDSHAKES_PER_ADDRESS: usize = 256;

/// Connections one gRPC port of a server holds open at once, and never more than a quarter of the
/// process's open-file limit (at least 64; every binary raises its soft limit at start:
/// [`crate::daemon::raise_open_files_limit`]); later ones wait in the kernel's backlog until one
/// closes. A node listens on a client and a peer port, so a flood of both still leaves half its
/// descriptors to its Raft links and storage.
pub const MAX_CONNECTIONS_PER_LISTENER: usize = 4096;

/// Connections the plain-HTTP metrics endpoint (`--metrics-listen`) holds open at once; later ones
/// wait in the kernel's backlog. A few scrapers need a few; unbounded, anyone who could reach the
/// port could take the descriptors the node's Raft links and storage need.
pub const MAX_METRICS_CONNECTIONS: usize = 64;

/// Longest a connection to the metrics endpoint stays open (a scrape takes milliseconds; a scraper
/// reconnects): idle ones held on purpose, or left by a scraper whose host vanished, free their slot
/// of [`MAX_METRICS_CONNECTIONS`] then. 61 s, not a minute: a scraper that keeps its connection and
/// scrapes every 15, 30 or 60 s would otherwise see it cut just as a scrape starts.
pub const METRICS_CONNECTION_LIFETIME: std::time::Duration = std::time::Duration::from_secs(61);

/// Answer bytes (mostly Get values) all callers together may leave unread at one process before reads
/// are refused as overloaded: a client can hold an HTTP/2 stream's window at zero, and the server
/// keeps that stream's answer until it goes ([`crate::rsm::answers`]).
pub const MAX_UNSENT_ANSWER_BYTES: usize = 256 << 20;

/// Answer bytes one caller (a certificate's identity; an IP address without TLS) may leave unread at
/// one process: a quarter of [`MAX_UNSENT_ANSWER_BYTES`], so one caller that reads nothing leaves the
/// rest to the others.
pub const MAX_UNSENT_ANSWER_BYTES_PER_CALLER: usize = MAX_UNSENT_ANSWER_BYTES / 4;

/// Largest log entry: a proposal above it is refused with a clear error, never appended.
pub const MAX_ENTRY_BYTES: usize = 32 << 20;

/// Largest message between Raft peers (AppendEntries with its entries, a snapshot chunk).
pub const MAX_PEER_MESSAGE_BYTES: usize = 64 << 20;

/// Largest shard-transfer answer: one page, which must also fit one log entry on the new owner.
pub const MAX_TRANSFER_BYTES: usize = MAX_ENTRY_BYTES;

/// The largest page a shard transfer can produce (see the module documentation): keys and values up
/// to [`PAGE_BYTES`] and one whole key beyond, or records filling what keys left of [`PAGE_BYTES`].
pub const MAX_PAGE_BYTES: usize = PAGE_BYTES + MAX_KEY_BYTES + MAX_VALUE_BYTES;

/// The largest final page versions before session pages produced (the whole session table rode on it):
/// an `Install` entry in an old log, or a page from an old owner during an upgrade, must still fit.
const LEGACY_MAX_PAGE_BYTES: usize = MAX_PAGE_BYTES + MAX_SESSIONS * MAX_SESSION_RECORD_BYTES;

// The relations above, checked when the crate compiles: raising one limit without the others fails the
// build, not a production group.
// Every accepted value can be written and read back in one client message.
const _: () = assert!(MAX_KEY_BYTES + MAX_VALUE_BYTES + 4096 < MAX_CLIENT_MESSAGE_BYTES);
// A remembered output fits its record (three varints, the owner's fixed64, two flags and framing
// around the value).
const _: () =
    assert!(MAX_REMEMBERED_VALUE_BYTES + 3 * 10 + 9 + 2 * 2 + 8 <= MAX_SESSION_RECORD_BYTES);
// A page of records holds at least one, and no more bytes of them than a page of keys may hold: the
// records ride within PAGE_BYTES, so MAX_PAGE_BYTES (keys, one whole key beyond) bounds every page.
const _: () = assert!(SESSION_PAGE_RECORDS >= 1);
const _: () = assert!(SESSION_PAGE_RECORDS * MAX_SESSION_RECORD_BYTES <= PAGE_BYTES);
// The largest page (with framing) fits one entry, and the largest entry one peer message with headroom
// for the envelope and the other entries of a batch.
const _: () = assert!(MAX_PAGE_BYTES + (1 << 20) < MAX_ENTRY_BYTES);
const _: () = assert!(LEGACY_MAX_PAGE_BYTES + (1 << 20) < MAX_ENTRY_BYTES);
const _: () = assert!(2 * MAX_ENTRY_BYTES <= MAX_PEER_MESSAGE_BYTES);
const _: () = assert!(DEFAULT_MAX_SESSIONS <= MAX_SESSIONS);
// A caller that reads its answers can always be given the largest one.
const _: () = assert!(MAX_CLIENT_MESSAGE_BYTES <= MAX_UNSENT_ANSWER_BYTES_PER_CALLER);
const _: () = assert!(MAX_UNSENT_ANSWER_BYTES_PER_CALLER <= MAX_UNSENT_ANSWER_BYTES);
const _: () = assert!(MAX_TRANSFER_BYTES <= MAX_ENTRY_BYTES);
// Every page (with framing), an old owner's final page too, is one transfer answer.
const _: () = assert!(LEGACY_MAX_PAGE_BYTES + (1 << 20) < MAX_TRANSFER_BYTES);

/// `text` cut to at most `max` bytes, at a character boundary: what a peer or a worker sent, kept or
/// echoed only up to a limit.
pub fn truncated(text: &str, max: usize) -> &str {
    let mut end = text.len().min(max);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    &text[..end]
}
