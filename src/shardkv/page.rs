//! A page of a shard in transfer: what one holds, how the old owner cuts it from its frozen copy, and
//! where the next one starts.
//!
//! Why pages, and why the dedup records page too: a page is one RPC answer and one log entry on the new
//! owner, so it must stay bounded however large the shard is — in keys and values, and in sessions: a
//! shard keeps up to [`crate::limits::MAX_SESSIONS`] dedup records, megabytes that would otherwise ride on
//! one final page. So a transfer walks the shard in two phases, with one [`Cursor`] that the new owner
//! keeps in its replicated state (a new leader, or a restart from a snapshot, resumes where it stood):
//! first the keys in key order, each page about [`PAGE_BYTES`] (at least one whole key); then the
//! records in client-id order, as many as the rest of a page holds at [`MAX_SESSION_RECORD_BYTES`] each
//! (the page that ends the keys starts on them, so a shard with few sessions still moves in one page).
//! Only the very last page is marked `last`: the new owner serves the shard, and the old owner records the copy served, then and
//! only then — never with part of the records, or a retry whose record had not arrived would be
//! applied a second time.
//!
//! The frozen copy never changes, so a page cut twice for the same cursor is the same page, and the
//! new owner installs a page only at its own cursor: a duplicated or out-of-order page is ignored.

use super::state::{ShardData, ShardId};
use crate::kv::KvOutput;
use crate::limits::{MAX_SESSION_RECORD_BYTES, SESSION_PAGE_RECORDS};
use crate::rsm::sessions::SessionRecord;
use crate::rsm::ClientId;

/// Bytes of keys and values, then of dedup records, per page of a shard in transfer: pages travel as
/// single RPC answers and single log entries, so a shard of any size moves in bounded messages.
pub const PAGE_BYTES: usize = crate::limits::PAGE_BYTES;

/// Where a shard transfer stands: the next page starts after this point. Keys move first, then dedup
/// records; the new owner keeps its cursor in its replicated state and asks for the page after it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Cursor {
    /// Moving keys: the next page holds the keys after this one (`None`: from the first key).
    Keys(Option<String>),
    /// Every key has moved: the next page holds the dedup records of the clients after this one
    /// (`None`: from the first record).
    Sessions(Option<ClientId>),
}

impl Default for Cursor {
    /// Nothing moved yet.
    fn default() -> Self {
        Cursor::Keys(None)
    }
}

/// One client's dedup record in transfer.
pub type SessionEntry = (ClientId, SessionRecord<KvOutput>);

/// One page of a shard moving between groups: the keys after `after` in key order, and once the keys
/// are done, dedup records in client order. See the module documentation.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ShardPage {
    /// The configuration in which the shard changed owner.
    pub config_num: u64,
    /// The shard.
    pub shard: ShardId,
    /// Where the page starts (the cursor the puller asked with).
    pub after: Cursor,
    /// The keys and values of the page (a page that starts among the records has none).
    pub data: Vec<(String, String)>,
    /// No keys remain after this page's: what follows are dedup records (on a page that starts among the
    /// keys; implied on one that starts among the records).
    pub keys_done: bool,
    /// Dedup records, in client order: after the keys are done, after the cursor's client.
    pub sessions: Vec<SessionEntry>,
    /// The largest client id whose record the shard had dropped (final page only; 0 elsewhere): the
    /// new owner refuses those clients' retries as the old owner did.
    pub evicted_max: ClientId,
    /// Whether this is the final page: the shard is complete once it is installed.
    pub last: bool,
}

impl ShardPage {
    /// The page of `contents` (frozen in `config_num`) that follows `after`. `session_pages`: the
    /// puller takes the records in pages; a puller of a version before session pages gets every record
    /// on the page that ends the keys, as it expects.
    pub fn cut(
        contents: &ShardData,
        config_num: u64,
        after: Cursor,
        session_pages: bool,
    ) -> ShardPage {
        let mut page = ShardPage {
            config_num,
            shard: contents.shard,
            after: after.clone(),
            ..ShardPage::default()
        };
        let (records_after, room) = match after {
            Cursor::Keys(key) => {
                let (data, more) = contents.data.page(key.as_deref(), PAGE_BYTES);
                let bytes: usize = data.iter().map(|(k, v)| k.len() + v.len()).sum();
                page.data = data;
                if more {
                    return page;
                }
                page.keys_done = true;
                let room = PAGE_BYTES.saturating_sub(bytes) / MAX_SESSION_RECORD_BYTES;
                (None, room)
            }
            Cursor::Sessions(client) => (client, SESSION_PAGE_RECORDS),
        };
        let room = if session_pages { room } else { usize::MAX };
        let (sessions, more) = contents.dedup.page(records_after, room);
        page.sessions = sessions;
        page.last = !more;
        if page.last {
            page.evicted_max = contents.dedup.evicted_max();
        }
        page
    }

    /// Where the transfer stands once this page is installed (unless it is the last).
    pub fn next_cursor(&self) -> Cursor {
        let last_client = self.sessions.last().map(|(client, _)| *client);
        match &self.after {
            Cursor::Keys(key) if !self.keys_done => {
                let last_key = self.data.last().map(|(k, _)| k.clone());
                Cursor::Keys(last_key.or_else(|| key.clone()))
            }
            Cursor::Keys(_) => Cursor::Sessions(last_client),
            Cursor::Sessions(client) => Cursor::Sessions(last_client.or(*client)),
        }
    }
}
