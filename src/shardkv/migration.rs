//! The shard migration protocol, written once: for each [`Duty`] the request a group's leader sends and
//! the command its answer turns into, and for the old owner how it answers a pull and a delete.
//!
//! Why a module of pure functions: the daemon's driver (over gRPC, `driver.rs` and `service.rs`) and the
//! simulator's groups (over the simulated network, `crate::sim::shardkv`) must run *the same* protocol,
//! or the 4B scenarios and both challenges verify a neighbour of the one in production. So everything
//! that decides — which request a duty needs, whether an answer fits the request, what to propose, how
//! the old owner serves — lives here, and both callers only move these values across their network.
//!
//! The choreography of one moved shard, in configuration `n`:
//! 1. new owner: `Duty::Pull` → [`Request::Pull`] to the old owner, which proposes [`serve_pull`] in
//!    its own log and answers with the page it outputs ([`pull_reply`]) → [`command`] checks the page
//!    ([`check_page`]) and gives `Install`; repeated page after page — the keys, then the dedup records
//!    (see [`super::page`]) — until the final one. Serving through the log (not a read) records that the
//!    final page went out;
//! 2. new owner: `Duty::Delete` → [`Request::Delete`] → the old owner proposes [`delete_command`] in
//!    **its own** log (only its log may change its state) and answers with [`delete_reply`] once
//!    applied → [`command`] gives `Confirmed`, which ends the duty.
//!
//! Who may pull or delete: the old owner's log records the caller (`by`, the group id in its
//! certificate; `None` in plaintext mode), and its state machine honours only the group the
//! configuration gave the shard to, and a delete only once the final page was served. So neither an
//! intruder nor a buggy group can take a shard that is not theirs or make its only copy vanish before
//! the new owner had it.
//!
//! Every command is idempotent in [`ShardKv`], so a lost answer, a retried request or a new leader
//! redoing a duty is harmless.

use super::key_to_shard;
use super::page::{Cursor, ShardPage};
use super::state::{last_owner, Duty, ShardCommand, ShardId, ShardKv, ShardOutput, Source};
use crate::ctrler::{Config, Gid};
use thiserror::Error;

/// A request for the page of `shard` (given away in `config_num`) that follows `after`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PullRequest {
    /// The configuration in which the shard moved.
    pub config_num: u64,
    /// The shard.
    pub shard: ShardId,
    /// Where the puller stands: the last key, then the last client's record, it installed.
    pub after: Cursor,
    /// The puller takes the dedup records in pages after the keys (this version always does; a
    /// request from a version before session pages does not, and is served as it expects).
    pub session_pages: bool,
}

/// A request to delete the frozen copy of `shard` given away in `config_num`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DeleteRequest {
    /// The configuration in which the shard moved.
    pub config_num: u64,
    /// The shard.
    pub shard: ShardId,
}

/// What a duty asks, and of whom.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Request {
    /// Ask the controllers for configuration `num`.
    Config {
        /// The configuration wanted.
        num: u64,
    },
    /// Read the controllers' history backwards, one configuration at a time as [`next_in_history`]
    /// says, to find where an orphaned shard is frozen.
    History {
        /// The shard.
        shard: ShardId,
        /// The configuration that gave it to this group; the history read is the one before it.
        before: u64,
    },
    /// Ask a page of the shard's previous owner.
    Pull {
        /// The previous owner.
        from: Source,
        /// The page.
        request: PullRequest,
    },
    /// Tell the previous owner its copy may go.
    Delete {
        /// The previous owner.
        to: Source,
        /// The copy.
        request: DeleteRequest,
    },
}

/// The request that performs `duty`.
pub fn request(duty: &Duty) -> Request {
    match duty {
        Duty::FetchConfig { num } => Request::Config { num: *num },
        Duty::FindOwner { shard, before } => Request::History {
            shard: *shard,
            before: *before,
        },
        Duty::Pull {
            config_num,
            shard,
            after,
            from,
        } => Request::Pull {
            from: from.clone(),
            request: PullRequest {
                config_num: *config_num,
                shard: *shard,
                after: after.clone(),
                session_pages: true,
            },
        },
        Duty::Delete {
            config_num,
            shard,
            to,
        } => Request::Delete {
            to: to.clone(),
            request: DeleteRequest {
                config_num: *config_num,
                shard: *shard,
            },
        },
    }
}

/// The configuration to read next while looking for `shard`'s last owner, given the configurations
/// read so far (newest first, all before `before`); `None` when the search is over: the oldest one read
/// gave the shard to a group, or configuration 1 was reached.
pub fn next_in_history(shard: ShardId, before: u64, read: &[Config]) -> Option<u64> {
    let owned = |config: &Config| config.shards.get(shard as usize).is_some_and(|&g| g != 0);
    match read.last() {
        None => before.checked_sub(1).filter(|&num| num >= 1),
        Some(oldest) if owned(oldest) => None,
        Some(oldest) => oldest.num.checked_sub(1).filter(|&num| num >= 1),
    }
}

/// A successful answer to a duty's request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Answer {
    /// The configuration the controllers returned.
    Config(Config),
    /// The configuration asked for was dropped by the controllers; this is the oldest they keep.
    Compacted(Config),
    /// The configurations read for [`Request::History`], newest first, as [`next_in_history`] asked.
    History(Vec<Config>),
    /// The page the previous owner served.
    Page(ShardPage),
    /// The previous owner has deleted its copy.
    Deleted,
}

/// Why an answer is not acted on. The duty stays and is performed again later.
#[derive(Clone, Debug, Error, PartialEq, Eq)]
pub enum Mismatch {
    /// The answer is of another kind than the duty's request.
    #[error("answer {answer} does not belong to duty {duty}")]
    Kind {
        /// The duty, as printed.
        duty: String,
        /// The answer's kind.
        answer: &'static str,
    },
    /// The controllers answered with another configuration (e.g. the latest, when `num` does not exist yet).
    #[error("asked for configuration {wanted}, got {got}")]
    Config {
        /// The configuration asked for.
        wanted: u64,
        /// The one returned.
        got: u64,
    },
    /// The configuration asked for was dropped, and the group may not jump to the oldest one kept: it
    /// owns shards (the controllers never drop what such a group needs: a bug, or a controller state
    /// restored from an old backup).
    #[error("configuration {wanted} was dropped by the controllers (the oldest kept is {oldest}) but the group owns shards and cannot skip it")]
    Compacted {
        /// The configuration asked for.
        wanted: u64,
        /// The oldest kept.
        oldest: u64,
    },
    /// The configuration splits the keys into another number of shards than the group's: following
    /// it would look for every stored key in another shard (see [`ShardKv::changes_shard_count`]).
    #[error("configuration {num} has {got} shards, the group's configurations {have}: a controller was started with another --shards; the group stays where it is")]
    ShardCount {
        /// The configuration offered.
        num: u64,
        /// Its shard count.
        got: usize,
        /// The group's.
        have: usize,
    },
    /// The page is not the one asked for, or its contents are not a page of that shard.
    #[error("bad page of shard {shard} (configuration {config_num}): {why}")]
    Page {
        /// The shard asked for.
        shard: ShardId,
        /// The configuration asked for.
        config_num: u64,
        /// What is wrong with it.
        why: String,
    },
}

/// Refuse a configuration that would change the group's shard count.
fn shard_count_kept(machine: &ShardKv, config: &Config) -> Result<(), Mismatch> {
    if machine.changes_shard_count(config) {
        return Err(Mismatch::ShardCount {
            num: config.num,
            got: config.shards.len(),
            have: machine.config().shards.len(),
        });
    }
    Ok(())
}

/// The command to propose for the answer to `duty` (one of `machine`'s duties, where `machine` is the
/// group's state as the answer arrives), or why the answer does not fit.
pub fn command(machine: &ShardKv, duty: &Duty, answer: Answer) -> Result<ShardCommand, Mismatch> {
    match (duty, answer) {
        (Duty::FetchConfig { num }, Answer::Config(config)) => {
            if config.num != *num {
                return Err(Mismatch::Config {
                    wanted: *num,
                    got: config.num,
                });
            }
            shard_count_kept(machine, &config)?;
            Ok(ShardCommand::NextConfig(config))
        }
        (Duty::FetchConfig { num }, Answer::Compacted(oldest)) => {
            shard_count_kept(machine, &oldest)?;
            if oldest.num >= *num && machine.can_jump_to(&oldest) {
                Ok(ShardCommand::NextConfig(oldest))
            } else {
                Err(Mismatch::Compacted {
                    wanted: *num,
                    oldest: oldest.num,
                })
            }
        }
        (Duty::FindOwner { shard, .. }, Answer::History(mut read)) => {
            read.reverse(); // last_owner wants them oldest first
            let (config_num, source) = match last_owner(*shard, &read) {
                Some((config_num, source)) => (config_num, Some(source)),
                None => (0, None),
            };
            Ok(ShardCommand::Adopt {
                shard: *shard,
                config_num,
                source,
            })
        }
        (
            Duty::Pull {
                config_num,
                shard,
                after,
                ..
            },
            Answer::Page(page),
        ) => {
            let asked = PullRequest {
                config_num: *config_num,
                shard: *shard,
                after: after.clone(),
                session_pages: true,
            };
            let shards = Some(machine.config().shards.len()).filter(|&n| n > 0);
            check_page(&asked, &page, shards)?;
            Ok(ShardCommand::Install(page))
        }
        (
            Duty::Delete {
                config_num, shard, ..
            },
            Answer::Deleted,
        ) => Ok(ShardCommand::Confirmed {
            config_num: *config_num,
            shard: *shard,
        }),
        (duty, answer) => Err(Mismatch::Kind {
            duty: format!("{duty:?}"),
            answer: match answer {
                Answer::Config(_) => "config",
                Answer::Compacted(_) => "compacted",
                Answer::History(_) => "history",
                Answer::Page(_) => "page",
                Answer::Deleted => "deleted",
            },
        }),
    }
}

/// Check that `page` is the page `asked` for and that it can be a page of that shard: same
/// configuration, shard and starting point (the phase, keys or records, included); keys strictly
/// increasing, all after the starting point and all of that shard (with `shards` known, i.e. the
/// puller's configuration's shard count), and none on a page of records; dedup records only once the
/// keys are done (or on the final page, as versions before session pages sent them), strictly increasing
/// by client id and after the starting client; and a page that is not the last must move the cursor.
/// A page that fails would install foreign or out-of-order keys or records, or have the puller ask for
/// the same page forever, so it is refused before it reaches the log.
pub fn check_page(
    asked: &PullRequest,
    page: &ShardPage,
    shards: Option<usize>,
) -> Result<(), Mismatch> {
    let bad = |why: String| Mismatch::Page {
        shard: asked.shard,
        config_num: asked.config_num,
        why,
    };
    if (page.config_num, page.shard, &page.after) != (asked.config_num, asked.shard, &asked.after) {
        return Err(bad(format!(
            "answered configuration {} shard {} after {:?} instead",
            page.config_num, page.shard, page.after
        )));
    }
    check_keys(asked, page, shards).map_err(bad)?;
    check_sessions(page).map_err(bad)?;
    if !page.last && page.next_cursor() == page.after {
        return Err(bad("a page that is not the last moves nothing".into()));
    }
    Ok(())
}

/// The keys of `page`: in order after the cursor's key, of the shard asked for; none on a page that
/// starts among the records.
fn check_keys(asked: &PullRequest, page: &ShardPage, shards: Option<usize>) -> Result<(), String> {
    let mut previous = match &asked.after {
        Cursor::Keys(key) => key.as_deref(),
        Cursor::Sessions(_) if page.data.is_empty() && !page.keys_done => return Ok(()),
        Cursor::Sessions(_) => return Err("keys on a page that starts among the records".into()),
    };
    for (key, _) in &page.data {
        if previous.is_some_and(|p| key.as_str() <= p) {
            return Err(format!("key {key:?} is out of order"));
        }
        if let Some(shards) = shards {
            if key_to_shard(key, shards) != asked.shard {
                return Err(format!("key {key:?} belongs to another shard"));
            }
        }
        previous = Some(key);
    }
    Ok(())
}

/// The dedup records of `page`: only after the keys, strictly increasing by client id, after the
/// cursor's client.
fn check_sessions(page: &ShardPage) -> Result<(), String> {
    let mut previous = match page.after {
        Cursor::Sessions(client) => client,
        Cursor::Keys(_) if page.keys_done || page.last || page.sessions.is_empty() => None,
        Cursor::Keys(_) => return Err("dedup records before the last key".into()),
    };
    for (client, _) in &page.sessions {
        if previous.is_some_and(|p| *client <= p) {
            return Err(format!("the record of client {client} is out of order"));
        }
        previous = Some(*client);
    }
    Ok(())
}

/// What the old owner answers to a transfer request, when it is the leader.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Reply<T> {
    /// Done, with this.
    Ok(T),
    /// Not yet: the old owner has not reached the configuration (or, for a pull of a copy already
    /// deleted, the puller is behind; for a delete, the final page has not been served). Ask again
    /// later.
    NotReady,
    /// The caller is not the group the shard was given to; `owner` is.
    NotOwner {
        /// The group the configuration gave the shard to.
        owner: Gid,
    },
}

/// The old owner's output was not an answer to the request (a bug, reported as an internal error).
#[derive(Clone, Debug, Error, PartialEq, Eq)]
#[error("unexpected answer to a {request}: {output}")]
pub struct Unexpected {
    /// Which request.
    pub request: &'static str,
    /// The output, as printed.
    pub output: String,
}

/// The command with which the old owner serves a pull from group `by` (`None`: callers are not
/// authenticated): proposed in its own log, so only a leader that still leads answers, and the final
/// page's going out is recorded before anyone can ask to delete the copy.
pub fn serve_pull(request: &PullRequest, by: Option<Gid>) -> ShardCommand {
    ShardCommand::Pull {
        config_num: request.config_num,
        shard: request.shard,
        after: request.after.clone(),
        by,
        session_pages: request.session_pages,
    }
}

/// The old owner's answer to a pull, from the output of [`serve_pull`]'s read.
pub fn pull_reply(output: ShardOutput) -> Result<Reply<ShardPage>, Unexpected> {
    match output {
        ShardOutput::Pulled(page) => Ok(Reply::Ok(page)),
        ShardOutput::NotReady => Ok(Reply::NotReady),
        ShardOutput::NotOwner(owner) => Ok(Reply::NotOwner { owner }),
        other => Err(Unexpected {
            request: "pull",
            output: format!("{other:?}"),
        }),
    }
}

/// The command the old owner proposes in its own log for a delete request from group `by` (`None`:
/// callers are not authenticated): only its log may change its state, so every replica (and every later
/// leader) agrees the copy is gone. Idempotent: deleting a copy already deleted answers `Dropped` again.
pub fn delete_command(request: &DeleteRequest, by: Option<Gid>) -> ShardCommand {
    ShardCommand::DropOutgoing {
        config_num: request.config_num,
        shard: request.shard,
        by,
    }
}

/// The old owner's answer to a delete, from the output of applying [`delete_command`].
pub fn delete_reply(output: ShardOutput) -> Result<Reply<()>, Unexpected> {
    match output {
        ShardOutput::Dropped => Ok(Reply::Ok(())),
        ShardOutput::NotReady | ShardOutput::Ignored => Ok(Reply::NotReady),
        ShardOutput::NotOwner(owner) => Ok(Reply::NotOwner { owner }),
        other => Err(Unexpected {
            request: "delete",
            output: format!("{other:?}"),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::kv::KvOutput;
    use crate::rsm::sessions::SessionRecord;

    fn asked(after: Option<&str>) -> PullRequest {
        asked_at(Cursor::Keys(after.map(String::from)))
    }

    fn asked_at(after: Cursor) -> PullRequest {
        PullRequest {
            config_num: 3,
            shard: 1,
            after,
            session_pages: true,
        }
    }

    fn page(after: Option<&str>, keys: &[&str], last: bool) -> ShardPage {
        ShardPage {
            config_num: 3,
            shard: 1,
            after: Cursor::Keys(after.map(String::from)),
            data: keys.iter().map(|k| (k.to_string(), "v".into())).collect(),
            keys_done: last,
            last,
            ..ShardPage::default()
        }
    }

    /// A page of the records of `clients`, starting at `after`.
    fn records(after: Cursor, clients: &[u64], last: bool) -> ShardPage {
        let record = |seq| SessionRecord {
            seq,
            owner: 0,
            output: KvOutput::default(),
            last_ms: 0,
        };
        ShardPage {
            config_num: 3,
            shard: 1,
            keys_done: matches!(after, Cursor::Keys(_)),
            after,
            sessions: clients.iter().map(|&c| (c, record(c))).collect(),
            last,
            ..ShardPage::default()
        }
    }

    #[test]
    fn a_page_of_records_must_be_the_phase_asked_for_and_in_client_order() {
        let sessions = |after: Option<u64>| Cursor::Sessions(after);
        let check = |after: Cursor, page: &ShardPage| check_page(&asked_at(after), page, Some(10));
        // The page that ends the keys starts on the records; then pages of records after a client.
        let first = records(Cursor::Keys(Some("k".into())), &[5, 9], false);
        assert_eq!(check(Cursor::Keys(Some("k".into())), &first), Ok(()));
        assert_eq!(first.next_cursor(), sessions(Some(9)));
        let next = records(sessions(Some(9)), &[12, 40], false);
        assert_eq!(check(sessions(Some(9)), &next), Ok(()));
        assert_eq!(
            check(sessions(Some(40)), &records(sessions(Some(40)), &[], true)),
            Ok(())
        );
        // Out of order, repeated, or not after the cursor's client.
        for clients in [&[12u64, 11][..], &[12, 12], &[9, 12], &[3]] {
            let page = records(sessions(Some(9)), clients, false);
            assert!(check(sessions(Some(9)), &page).is_err(), "{clients:?}");
        }
        // Another phase than asked: records for a key cursor, keys for a record cursor.
        assert!(check(sessions(None), &first).is_err());
        assert!(check(
            Cursor::Keys(Some("k".into())),
            &records(sessions(None), &[5], false)
        )
        .is_err());
        let mut keys_among_records = records(sessions(Some(9)), &[12], false);
        keys_among_records.data.push(("x".into(), "v".into()));
        assert!(check(sessions(Some(9)), &keys_among_records).is_err());
        // Records before the keys are done.
        let early = ShardPage {
            sessions: records(sessions(None), &[5], false).sessions,
            ..page(None, &[], false)
        };
        assert!(check(Cursor::Keys(None), &early).is_err());
        // A page that is not the last must move the cursor, or the puller would ask for it forever.
        assert!(check(sessions(Some(9)), &records(sessions(Some(9)), &[], false)).is_err());
        assert!(check(Cursor::Keys(Some("k".into())), &page(Some("k"), &[], false)).is_err());
        // The page that ends the keys may hold no record yet: it moves the cursor to them.
        let mut ends_keys = page(Some("k"), &[], false);
        ends_keys.keys_done = true;
        assert_eq!(check(Cursor::Keys(Some("k".into())), &ends_keys), Ok(()));
        assert_eq!(ends_keys.next_cursor(), sessions(None));
        // A final page from a version before session pages: keys, then every record, `keys_done` unset.
        let mut legacy = records(Cursor::Keys(None), &[1, 2, 3], true);
        legacy.keys_done = false;
        assert_eq!(check(Cursor::Keys(None), &legacy), Ok(()));
    }

    #[test]
    fn a_page_must_be_the_one_asked_for_and_in_key_order() {
        assert_eq!(
            check_page(&asked(None), &page(None, &["a", "b"], true), None),
            Ok(())
        );
        assert!(check_page(&asked(Some("a")), &page(None, &["b"], true), None).is_err());
        assert!(check_page(&asked(None), &page(None, &["b", "a"], true), None).is_err());
        assert!(check_page(&asked(Some("b")), &page(Some("b"), &["a"], false), None).is_err());
        let mut other_shard = page(None, &["a"], true);
        other_shard.shard = 2;
        assert!(check_page(&asked(None), &other_shard, None).is_err());
    }

    #[test]
    fn a_page_with_keys_of_another_shard_is_refused() {
        let shards = 10;
        let keys: Vec<String> = (0..100).map(|i| format!("k{i:03}")).collect();
        let mine: Vec<&str> = keys
            .iter()
            .filter(|k| key_to_shard(k, shards) == 1)
            .map(String::as_str)
            .collect();
        let foreign = keys
            .iter()
            .find(|k| key_to_shard(k, shards) != 1)
            .map(String::as_str)
            .unwrap_or("none");
        assert_eq!(
            check_page(&asked(None), &page(None, &mine, true), Some(shards)),
            Ok(())
        );
        assert!(check_page(&asked(None), &page(None, &[foreign], true), Some(shards)).is_err());
    }

    #[test]
    fn only_the_configuration_asked_for_is_proposed() {
        let duty = Duty::FetchConfig { num: 4 };
        let latest = Config {
            num: 3,
            ..Config::default()
        };
        let machine = ShardKv::new(1);
        assert!(command(&machine, &duty, Answer::Config(latest)).is_err());
        let next = Config {
            num: 4,
            ..Config::default()
        };
        assert_eq!(
            command(&machine, &duty, Answer::Config(next.clone())),
            Ok(ShardCommand::NextConfig(next))
        );
        assert!(command(&machine, &duty, Answer::Deleted).is_err());
    }

    #[test]
    fn the_history_is_read_backwards_until_an_owner() {
        let config = |num: u64, owner: u64| Config {
            num,
            shards: vec![0, owner],
            ..Config::default()
        };
        assert_eq!(next_in_history(1, 5, &[]), Some(4));
        assert_eq!(next_in_history(1, 5, &[config(4, 0)]), Some(3));
        assert_eq!(next_in_history(1, 5, &[config(4, 0), config(3, 7)]), None);
        assert_eq!(next_in_history(1, 2, &[config(1, 0)]), None);
        assert_eq!(next_in_history(1, 1, &[]), None);
    }

    #[test]
    fn the_old_owner_answers_only_what_it_did() {
        assert_eq!(delete_reply(ShardOutput::Dropped), Ok(Reply::Ok(())));
        assert_eq!(delete_reply(ShardOutput::NotReady), Ok(Reply::NotReady));
        assert!(delete_reply(ShardOutput::WrongGroup).is_err());
        assert_eq!(pull_reply(ShardOutput::NotReady), Ok(Reply::NotReady));
    }
}
