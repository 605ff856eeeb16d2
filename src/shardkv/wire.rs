//! A shard group's records on the wire and on disk: snapshot state, log entries, outputs, and the pages
//! of a shard in transfer, each ⇄ its protobuf (`proto/shardkv.proto`). Kept apart from the state
//! machine (as `raft/wire.rs` is from the Raft core) so `state.rs` reads as the protocol alone.
//!
//! Why snapshots are byte-identical across replicas: every collection is encoded from a `BTreeMap` in
//! key order; pages' keys are sorted on decoding because protobuf maps carry no order (a page's dedup
//! records are a list, kept in the order they came, which `migration::check_page` checks).
//!
//! A transfer [`Cursor`] is two fields wherever it is stored (a key `after`/`cursor`, and a
//! `SessionCursor` once the keys are done), so everything written before session pages — a cursor in a
//! snapshot, a `Pull` or `Install` in a log — decodes as the key cursor it was.

use super::page::{Cursor, SessionEntry, ShardPage};
use super::state::{
    Dedup, Frozen, Owned, ShardCommand, ShardData, ShardKv, ShardOutput, Source, ANY_GROUP,
};
use crate::ctrler::state::{config_from_proto, config_to_proto};
use crate::ctrler::Gid;
use crate::kv::{KvCommand, KvOutput};
use crate::proto::kv as kvpb;
use crate::proto::shardkv as pb;
use crate::rsm::sessions::SessionRecord;
use crate::rsm::{ClientId, RsmError};
use bytes::Bytes;
use prost::Message as _;

/// Encode a group's whole state for a snapshot.
pub fn encode_state(machine: &ShardKv) -> Bytes {
    let state = pb::State {
        gid: machine.gid,
        config: Some(config_to_proto(&machine.config)),
        shards: machine.shards.values().map(owned_to_proto).collect(),
        outgoing: Vec::new(),
        frozen: machine
            .outgoing
            .values()
            .map(|frozen| pb::Frozen {
                contents: Some(shard_to_proto(&frozen.contents)),
                to_gid: frozen.to,
                served: frozen.served,
            })
            .collect(),
        confirms: machine
            .confirms
            .iter()
            .map(|(&(config_num, shard), source)| pb::Confirm {
                config_num,
                shard,
                gid: source.gid,
                servers: source.servers.clone(),
            })
            .collect(),
    };
    Bytes::from(state.encode_to_vec())
}

fn owned_to_proto(owned: &Owned) -> pb::OwnedShard {
    let (cursor, sessions_cursor) = cursor_to_proto(&owned.cursor);
    pb::OwnedShard {
        shard: owned.contents.shard,
        pulling: owned.pulling.is_some(),
        from_gid: owned.pulling.as_ref().map_or(0, |s| s.gid),
        from_servers: owned
            .pulling
            .as_ref()
            .map_or_else(Vec::new, |s| s.servers.clone()),
        contents: Some(shard_to_proto(&owned.contents)),
        cursor,
        sessions_cursor,
    }
}

/// Decode the state of group `gid` from a snapshot; a snapshot of another group is refused.
pub fn decode_state(gid: Gid, data: &[u8]) -> Result<ShardKv, RsmError> {
    let state = pb::State::decode(data).map_err(|e| decode_error("shard group state", e))?;
    if state.gid != gid {
        return Err(RsmError::Decode {
            what: "shard group state",
            detail: format!(
                "the snapshot belongs to group {}, this is group {}",
                state.gid, gid
            ),
        });
    }
    let config = state.config.map(config_from_proto).unwrap_or_default();
    let shards = state
        .shards
        .into_iter()
        .map(|s| {
            let pulling = s.pulling.then_some(Source {
                gid: s.from_gid,
                servers: s.from_servers,
            });
            let contents = shard_from_proto(s.contents.unwrap_or_default());
            let owned = Owned {
                pulling,
                cursor: cursor_from_proto(s.cursor, s.sessions_cursor),
                contents,
            };
            (s.shard, owned)
        })
        .collect();
    // Copies frozen by a version that kept no owner (already served, as then): restored at the
    // configuration that gave one away, its owner is that configuration's; after it, not known here,
    // so anybody may take it, as then.
    let legacy = state.outgoing.into_iter().map(|d| {
        let contents = shard_from_proto(d);
        let to = if contents.config_num == config.num {
            let shard = usize::try_from(contents.shard).unwrap_or(usize::MAX);
            config.shards.get(shard).copied().unwrap_or(ANY_GROUP)
        } else {
            ANY_GROUP
        };
        Frozen {
            contents,
            to,
            served: true,
        }
    });
    let frozen = state.frozen.into_iter().map(|f| Frozen {
        contents: shard_from_proto(f.contents.unwrap_or_default()),
        to: f.to_gid,
        served: f.served,
    });
    let outgoing = legacy
        .chain(frozen)
        .map(|f| ((f.contents.config_num, f.contents.shard), f))
        .collect();
    let confirms = state
        .confirms
        .into_iter()
        .map(|c| {
            let source = Source {
                gid: c.gid,
                servers: c.servers,
            };
            ((c.config_num, c.shard), source)
        })
        .collect();
    Ok(ShardKv {
        gid,
        config,
        shards,
        outgoing,
        confirms,
        clock: Default::default(),
    })
}

/// Encode a command as a log entry.
pub fn encode_command(command: &ShardCommand) -> Bytes {
    use pb::command::Op;
    let op = match command {
        ShardCommand::Client {
            client,
            seq,
            owner,
            command,
        } => Op::Client(pb::ClientCommand {
            client_id: *client,
            seq: *seq,
            command: Some(kvpb::Command::from(command)),
            owner: *owner,
        }),
        ShardCommand::NextConfig(config) => Op::NextConfig(config_to_proto(config)),
        ShardCommand::Install(page) => Op::Install(page_to_proto(page)),
        ShardCommand::Pull {
            config_num,
            shard,
            after,
            by,
            session_pages,
        } => {
            let (after, after_sessions) = cursor_to_proto(after);
            Op::Pull(pb::Transfer {
                config_num: *config_num,
                shard: *shard,
                after,
                by_gid: by.unwrap_or(0),
                after_sessions,
                session_pages: *session_pages,
            })
        }
        ShardCommand::DropOutgoing {
            config_num,
            shard,
            by,
        } => Op::Drop(pb::Transfer {
            config_num: *config_num,
            shard: *shard,
            by_gid: by.unwrap_or(0),
            ..pb::Transfer::default()
        }),
        ShardCommand::Adopt {
            shard,
            config_num,
            source,
        } => Op::Adopt(pb::Adopt {
            shard: *shard,
            config_num: *config_num,
            gid: source.as_ref().map_or(0, |s| s.gid),
            servers: source.as_ref().map_or_else(Vec::new, |s| s.servers.clone()),
        }),
        ShardCommand::Confirmed { config_num, shard } => Op::Confirmed(pb::ShardRef {
            config_num: *config_num,
            shard: *shard,
        }),
    };
    Bytes::from(pb::Command { op: Some(op) }.encode_to_vec())
}

/// Decode a log entry; malformed bytes are refused, never guessed at.
pub fn decode_command(data: &[u8]) -> Result<ShardCommand, RsmError> {
    use pb::command::Op;
    let command = pb::Command::decode(data).map_err(|e| decode_error("shard group command", e))?;
    Ok(match command.op {
        Some(Op::Client(c)) => ShardCommand::Client {
            client: c.client_id,
            seq: c.seq,
            owner: c.owner,
            command: KvCommand::try_from(c.command.unwrap_or_default())?,
        },
        Some(Op::NextConfig(config)) => ShardCommand::NextConfig(config_from_proto(config)),
        Some(Op::Install(page)) => ShardCommand::Install(page_from_proto(page)),
        Some(Op::DropOutgoing(r)) => ShardCommand::DropOutgoing {
            config_num: r.config_num,
            shard: r.shard,
            by: None,
        },
        Some(Op::Pull(t)) => ShardCommand::Pull {
            config_num: t.config_num,
            shard: t.shard,
            after: cursor_from_proto(t.after, t.after_sessions),
            by: (t.by_gid != 0).then_some(t.by_gid),
            session_pages: t.session_pages,
        },
        Some(Op::Drop(t)) => ShardCommand::DropOutgoing {
            config_num: t.config_num,
            shard: t.shard,
            by: (t.by_gid != 0).then_some(t.by_gid),
        },
        Some(Op::Adopt(a)) => ShardCommand::Adopt {
            shard: a.shard,
            config_num: a.config_num,
            source: (a.gid != 0).then_some(Source {
                gid: a.gid,
                servers: a.servers,
            }),
        },
        Some(Op::Confirmed(r)) => ShardCommand::Confirmed {
            config_num: r.config_num,
            shard: r.shard,
        },
        None => {
            return Err(RsmError::Decode {
                what: "shard group command",
                detail: "no operation".into(),
            })
        }
    })
}

/// Encode an output (for the session table of a snapshot).
pub fn encode_output(output: &ShardOutput) -> Bytes {
    Bytes::from(output_to_proto(output).encode_to_vec())
}

/// Decode an output.
pub fn decode_output(data: &[u8]) -> Result<ShardOutput, RsmError> {
    use pb::output::Result as R;
    let output = pb::Output::decode(data).map_err(|e| decode_error("shard group output", e))?;
    Ok(match output.result {
        Some(R::Kv(outcome)) => ShardOutput::Kv(KvOutput::from(outcome)),
        Some(R::SessionExpired(mark)) => ShardOutput::SessionExpired(mark),
        Some(R::WrongGroup(_)) => ShardOutput::WrongGroup,
        Some(R::Pulled(page)) => ShardOutput::Pulled(page_from_proto(page)),
        Some(R::NotReady(_)) => ShardOutput::NotReady,
        Some(R::Dropped(_)) => ShardOutput::Dropped,
        Some(R::NotOwner(gid)) => ShardOutput::NotOwner(gid),
        Some(R::Ignored(_)) | None => ShardOutput::Ignored,
    })
}

fn decode_error(what: &'static str, e: prost::DecodeError) -> RsmError {
    RsmError::Decode {
        what,
        detail: e.to_string(),
    }
}

fn output_to_proto(output: &ShardOutput) -> pb::Output {
    use pb::output::Result as R;
    let result = match output {
        ShardOutput::Kv(kv) => R::Kv(kvpb::Outcome::from(kv)),
        ShardOutput::SessionExpired(mark) => R::SessionExpired(*mark),
        ShardOutput::WrongGroup => R::WrongGroup(true),
        ShardOutput::Ignored => R::Ignored(true),
        ShardOutput::Pulled(page) => R::Pulled(page_to_proto(page)),
        ShardOutput::NotReady => R::NotReady(true),
        ShardOutput::Dropped => R::Dropped(true),
        ShardOutput::NotOwner(gid) => R::NotOwner(*gid),
    };
    pb::Output {
        result: Some(result),
    }
}

/// A transfer cursor as its two stored fields: the key (`after`, `cursor`) and, once the keys are done,
/// the `SessionCursor`.
pub fn cursor_to_proto(cursor: &Cursor) -> (Option<String>, Option<pb::SessionCursor>) {
    match cursor {
        Cursor::Keys(key) => (key.clone(), None),
        Cursor::Sessions(client) => (
            None,
            Some(pb::SessionCursor {
                after_client: *client,
            }),
        ),
    }
}

/// A transfer cursor from its two stored fields; without a `SessionCursor` (always, in what versions
/// before session pages wrote) it is the key cursor.
pub fn cursor_from_proto(key: Option<String>, sessions: Option<pb::SessionCursor>) -> Cursor {
    match sessions {
        Some(sessions) => Cursor::Sessions(sessions.after_client),
        None => Cursor::Keys(key),
    }
}

fn record_to_proto(client_id: ClientId, record: &SessionRecord<KvOutput>) -> pb::Dedup {
    pb::Dedup {
        client_id,
        seq: record.seq,
        outcome: Some(kvpb::Outcome::from(&record.output)),
        last_ms: record.last_ms,
        owner: record.owner,
    }
}

/// Decode a dedup record; its output is bounded as it would have been when recorded (records written
/// by versions that kept whole values shrink here).
fn record_from_proto(d: pb::Dedup) -> SessionEntry {
    let output = KvOutput::from(d.outcome.unwrap_or_default()).remembered();
    let record = SessionRecord {
        seq: d.seq,
        owner: d.owner,
        output,
        last_ms: d.last_ms,
    };
    (d.client_id, record)
}

fn dedup_to_proto(dedup: &Dedup) -> Vec<pb::Dedup> {
    dedup
        .iter()
        .map(|(&client_id, record)| record_to_proto(client_id, record))
        .collect()
}

fn dedup_from_proto(dedup: Vec<pb::Dedup>, evicted_max: ClientId) -> Dedup {
    Dedup::from_parts(dedup.into_iter().map(record_from_proto), evicted_max)
}

/// Encode a shard for snapshots.
pub fn shard_to_proto(data: &ShardData) -> pb::ShardData {
    pb::ShardData {
        config_num: data.config_num,
        shard: data.shard,
        data: data
            .data
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
        dedup: dedup_to_proto(&data.dedup),
        dedup_evicted_max: data.dedup.evicted_max(),
        after: None,
        last: true,
        after_sessions: None,
        keys_done: false,
    }
}

/// Decode a shard from a snapshot.
pub fn shard_from_proto(data: pb::ShardData) -> ShardData {
    ShardData {
        config_num: data.config_num,
        shard: data.shard,
        data: data.data.into_iter().collect(),
        dedup: dedup_from_proto(data.dedup, data.dedup_evicted_max),
    }
}

/// Encode a page of a shard in transfer (the Pull answer, the Install log entry).
pub fn page_to_proto(page: &ShardPage) -> pb::ShardData {
    let (after, after_sessions) = cursor_to_proto(&page.after);
    pb::ShardData {
        config_num: page.config_num,
        shard: page.shard,
        data: page.data.iter().cloned().collect(),
        dedup: page
            .sessions
            .iter()
            .map(|(client, record)| record_to_proto(*client, record))
            .collect(),
        dedup_evicted_max: page.evicted_max,
        after,
        last: page.last,
        after_sessions,
        keys_done: page.keys_done,
    }
}

/// Decode a page of a shard in transfer. A final page from a version before session pages (keys, then
/// every record of the shard's table, `keys_done` unset) decodes as the final page it is.
pub fn page_from_proto(page: pb::ShardData) -> ShardPage {
    let mut data: Vec<(String, String)> = page.data.into_iter().collect();
    // Protobuf maps have no order; pages are applied in key order.
    data.sort();
    ShardPage {
        config_num: page.config_num,
        shard: page.shard,
        after: cursor_from_proto(page.after, page.after_sessions),
        data,
        keys_done: page.keys_done,
        sessions: page.dedup.into_iter().map(record_from_proto).collect(),
        evicted_max: page.dedup_evicted_max,
        last: page.last,
    }
}
