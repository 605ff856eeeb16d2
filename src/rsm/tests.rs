use super::*;
use crate::kv::{KvCommand, KvOutput, KvQuery, KvStore};
use crate::raft::SnapshotMeta;

fn put(key: &str, value: &str) -> KvCommand {
    KvCommand::Put {
        key: key.into(),
        value: value.into(),
    }
}

fn append(key: &str, value: &str) -> KvCommand {
    KvCommand::Append {
        key: key.into(),
        value: value.into(),
    }
}

fn entry(index: Index, data: Bytes) -> Entry {
    Entry {
        index,
        term: 1,
        kind: EntryKind::Normal,
        data,
    }
}

fn proposal(rsm: &Rsm<KvStore>, client: ClientId, seq: Seq, command: &KvCommand) -> Bytes {
    match rsm.prepare(client, seq, command) {
        Prepared::Propose(bytes) => bytes,
        other => panic!("expected a proposal, got {other:?}"),
    }
}

fn get(rsm: &Rsm<KvStore>, key: &str) -> Option<String> {
    rsm.machine().query(&KvQuery::Get { key: key.into() }).value
}

#[test]
fn a_command_in_the_log_twice_is_applied_once() {
    let mut rsm = Rsm::new(KvStore::default());
    let data = proposal(&rsm, 7, 1, &append("k", "x"));
    assert_eq!(rsm.track(100, 1, 7, 1), None);
    // The client retried on another leader before hearing back: the same command is in the log twice.
    let done = rsm
        .apply_entries(&[entry(1, data.clone()), entry(2, data)])
        .expect("apply");
    assert_eq!(
        done,
        vec![Completion::Done {
            token: 100,
            output: KvOutput {
                ok: true,
                value: None
            }
        }]
    );
    assert_eq!(get(&rsm, "k").as_deref(), Some("x"));
    // A third retry is answered from the session table without a proposal.
    assert!(matches!(
        rsm.prepare(7, 1, &append("k", "x")),
        Prepared::Answered(_)
    ));
    assert_eq!(rsm.prepare(7, 0, &append("k", "x")), Prepared::Stale);
}

#[test]
fn a_replaced_entry_tells_the_waiter_to_retry() {
    let mut rsm = Rsm::new(KvStore::default());
    let _mine = proposal(&rsm, 1, 1, &put("a", "1"));
    rsm.track(5, 1, 1, 1);
    // A new leader put someone else's command at index 1.
    let theirs = proposal(&rsm, 2, 1, &put("a", "2"));
    let done = rsm.apply_entries(&[entry(1, theirs)]).expect("apply");
    assert_eq!(done, vec![Completion::Retry { token: 5 }]);
    assert_eq!(get(&rsm, "a").as_deref(), Some("2"));
}

#[test]
fn reads_wait_for_their_index_and_fail_on_leadership_loss() {
    let mut rsm = Rsm::new(KvStore::default());
    let data = proposal(&rsm, 1, 1, &put("a", "1"));
    assert_eq!(rsm.read(9, 1, KvQuery::Get { key: "a".into() }), None);
    let done = rsm.apply_entries(&[entry(1, data)]).expect("apply");
    assert_eq!(
        done,
        vec![Completion::Done {
            token: 9,
            output: KvOutput {
                ok: true,
                value: Some("1".into())
            }
        }]
    );
    assert_eq!(rsm.read(10, 5, KvQuery::Get { key: "a".into() }), None);
    assert_eq!(rsm.leadership_lost(), vec![Completion::Retry { token: 10 }]);
}

#[test]
fn snapshots_carry_state_and_sessions() {
    let mut rsm = Rsm::new(KvStore::default());
    let first = proposal(&rsm, 3, 1, &put("a", "1"));
    rsm.apply_entries(&[entry(1, first.clone())])
        .expect("apply");
    let (index, data) = rsm.snapshot();
    let mut restored = Rsm::new(KvStore::default());
    restored.track(1, 1, 3, 1);
    let done = restored
        .apply_snapshot(&Snapshot {
            meta: SnapshotMeta { index, term: 1 },
            data,
        })
        .expect("restore");
    // The waiter's command is in the snapshot: the session table answers it.
    assert!(matches!(
        done.as_slice(),
        [Completion::Done { token: 1, .. }]
    ));
    assert_eq!(get(&restored, "a").as_deref(), Some("1"));
    // Replaying the same command after the snapshot applies nothing.
    restored.apply_entries(&[entry(2, first)]).expect("apply");
    assert_eq!(get(&restored, "a").as_deref(), Some("1"));
    assert_eq!(restored.applied(), 2);
}

#[test]
fn corrupt_entries_are_errors_not_panics() {
    let mut rsm = Rsm::new(KvStore::default());
    let err = rsm
        .apply_entries(&[entry(1, Bytes::from_static(b"\xff\xff\xff"))])
        .expect_err("must fail");
    assert!(matches!(err, RsmError::Decode { .. }));
    assert!(matches!(
        rsm.apply_entries(&[entry(5, Bytes::new())]),
        Err(RsmError::OutOfOrder { .. })
    ));
}

#[test]
fn cas_swaps_only_on_a_match() {
    let mut store = KvStore::default();
    let cas = |expected: Option<&str>, value: &str| KvCommand::Cas {
        key: "k".into(),
        expected: expected.map(str::to_string),
        value: value.into(),
    };
    assert!(store.apply(cas(None, "a")).ok);
    let miss = store.apply(cas(None, "b"));
    assert_eq!((miss.ok, miss.value.as_deref()), (false, Some("a")));
    assert!(store.apply(cas(Some("a"), "c")).ok);
    assert!(store.apply(KvCommand::Delete { key: "k".into() }).ok);
    assert!(!store.apply(KvCommand::Delete { key: "k".into() }).ok);
}

/// A KV store that keeps no sessions in `Rsm` (as a shard group does): outputs live nowhere but in the
/// completion of the entry's waiter.
struct NoSessions(KvStore);

impl StateMachine for NoSessions {
    type Command = KvCommand;
    type Query = KvQuery;
    type Output = KvOutput;
    const SESSIONS: bool = false;

    fn apply(&mut self, command: KvCommand) -> KvOutput {
        self.0.apply(command)
    }
    fn query(&self, query: &KvQuery) -> KvOutput {
        self.0.query(query)
    }
    fn snapshot(&self) -> Bytes {
        self.0.snapshot()
    }
    fn restore(&mut self, data: &[u8]) -> Result<(), RsmError> {
        self.0.restore(data)
    }
    fn encode_command(command: &KvCommand) -> Bytes {
        KvStore::encode_command(command)
    }
    fn decode_command(data: &[u8]) -> Result<KvCommand, RsmError> {
        KvStore::decode_command(data)
    }
    fn encode_output(output: &KvOutput) -> Bytes {
        KvStore::encode_output(output)
    }
    fn decode_output(data: &[u8]) -> Result<KvOutput, RsmError> {
        KvStore::decode_output(data)
    }
}

#[test]
fn an_entry_applied_before_its_index_is_known_still_answers_its_proposer() {
    let mut rsm = Rsm::new(NoSessions(KvStore::default()));
    let command = append("k", "x");
    let Prepared::Propose(data) = rsm.prepare(0, 41, &command) else {
        panic!("no proposal")
    };
    rsm.expect(0, 41);
    // A one-node group commits and applies before the proposer hears its index.
    assert!(rsm
        .apply_entries(&[entry(1, data)])
        .expect("apply")
        .is_empty());
    let appended = KvOutput {
        ok: true,
        value: None,
    };
    assert_eq!(
        rsm.track(9, 1, 0, 41),
        Some(Completion::Done {
            token: 9,
            output: appended
        })
    );
    // Without the expectation (withdrawn, or another proposal's index) the waiter must retry.
    let Prepared::Propose(data) = rsm.prepare(0, 43, &command) else {
        panic!("no proposal")
    };
    rsm.expect(0, 43);
    rsm.withdraw(0, 43);
    rsm.apply_entries(&[entry(2, data)]).expect("apply");
    assert_eq!(
        rsm.track(10, 2, 0, 43),
        Some(Completion::Retry { token: 10 })
    );
    assert!(rsm.expected.is_empty(), "an expectation was left behind");
}
