use super::*;
use crate::kv::{KvCommand, KvOutput, KvQuery, KvStore};
use crate::raft::SnapshotMeta;
use crate::rsm::sessions::{self, LogPolicy};

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
    match rsm.prepare(client, seq, 0, command, 1) {
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
    assert_eq!(rsm.track(100, 1, (7, 1, 0)), None);
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
                value: None,
                elided: false,
                over_quota: false,
            }
        }]
    );
    assert_eq!(get(&rsm, "k").as_deref(), Some("x"));
    // A third retry is answered from the session table without a proposal.
    assert!(matches!(
        rsm.prepare(7, 1, 0, &append("k", "x"), 1),
        Prepared::Answered(_)
    ));
    assert_eq!(rsm.prepare(7, 0, 0, &append("k", "x"), 1), Prepared::Stale);
}

/// A write this node proposed and then lost leadership with may still commit under the next leader:
/// its waiter is told the outcome is unknown, not that it was refused (a client would take a refusal
/// as "not applied"). A read is simply retried.
#[test]
fn a_write_in_flight_when_leadership_is_lost_has_an_unknown_outcome() {
    let mut rsm = Rsm::new(KvStore::default());
    let _mine = proposal(&rsm, 1, 1, &put("a", "1"));
    rsm.track(5, 1, (1, 1, 0));
    assert_eq!(rsm.read(6, 1, KvQuery::Get { key: "a".into() }), None);
    let mut lost = rsm.leadership_lost();
    lost.sort_by_key(|c| match c {
        Completion::Done { token, .. }
        | Completion::Retry { token }
        | Completion::Unknown { token }
        | Completion::SessionExpired { token, .. } => *token,
    });
    assert_eq!(
        lost,
        vec![
            Completion::Unknown { token: 5 },
            Completion::Retry { token: 6 }
        ]
    );
}

#[test]
fn a_replaced_entry_tells_the_waiter_to_retry() {
    let mut rsm = Rsm::new(KvStore::default());
    let _mine = proposal(&rsm, 1, 1, &put("a", "1"));
    rsm.track(5, 1, (1, 1, 0));
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
                value: Some("1".into()),
                elided: false,
                over_quota: false,
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
    restored.track(1, 1, (3, 1, 0));
    let done = restored
        .apply_snapshot(&Snapshot {
            meta: SnapshotMeta { index, term: 1 },
            data,
            membership: None,
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
#[derive(Clone)]
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
    let Prepared::Propose(data) = rsm.prepare(0, 41, 0, &command, 1) else {
        panic!("no proposal")
    };
    rsm.expect(0, 41, 0);
    // A one-node group commits and applies before the proposer hears its index.
    assert!(rsm
        .apply_entries(&[entry(1, data)])
        .expect("apply")
        .is_empty());
    let appended = KvOutput {
        ok: true,
        value: None,
        elided: false,
        over_quota: false,
    };
    assert_eq!(
        rsm.track(9, 1, (0, 41, 0)),
        Some(Completion::Done {
            token: 9,
            output: appended
        })
    );
    // Without the expectation (withdrawn, or another proposal's index) the waiter must retry.
    let Prepared::Propose(data) = rsm.prepare(0, 43, 0, &command, 1) else {
        panic!("no proposal")
    };
    rsm.expect(0, 43, 0);
    rsm.withdraw(0, 43, 0);
    rsm.apply_entries(&[entry(2, data)]).expect("apply");
    assert_eq!(
        rsm.track(10, 2, (0, 43, 0)),
        Some(Completion::Retry { token: 10 })
    );
    assert!(rsm.expected.is_empty(), "an expectation was left behind");
}

/// Client ids as clerks make them: their clock (ms), then random bits.
fn client_at(ms: u64, n: u64) -> ClientId {
    (ms << sessions::CLIENT_ID_RANDOM_BITS) | n
}

fn capped(max_sessions: u64) -> LogPolicy {
    LogPolicy {
        ttl_ms: 60_000,
        max_sessions,
        quota_bytes: 0,
    }
}

/// Apply `command` for (`client`, `seq`) proposed at `now_ms` as the next entry; its completion.
fn apply_one(
    rsm: &mut Rsm<KvStore>,
    token: Token,
    client: ClientId,
    seq: Seq,
    command: &KvCommand,
    now_ms: u64,
) -> Completion<KvOutput> {
    let Prepared::Propose(data) = rsm.prepare(client, seq, 0, command, now_ms) else {
        panic!("no proposal for client {client} seq {seq}")
    };
    let index = rsm.applied() + 1;
    assert_eq!(rsm.track(token, index, (client, seq, 0)), None);
    let mut done = rsm.apply_entries(&[entry(index, data)]).expect("apply");
    assert_eq!(done.len(), 1);
    done.remove(0)
}

#[test]
fn twenty_thousand_one_shot_clients_leave_at_most_the_cap_behind() {
    let mut rsm = Rsm::with_policy(KvStore::default(), capped(1_000));
    let start = 1_800_000_000_000;
    for n in 0..20_000u64 {
        let client = client_at(start + n, n);
        let done = apply_one(
            &mut rsm,
            n,
            client,
            1,
            &put(&format!("k{n}"), "v"),
            start + n,
        );
        assert!(matches!(done, Completion::Done { .. }));
        assert!(rsm.sessions() <= 1_000);
    }
    assert_eq!(rsm.sessions(), 1_000);
    assert_eq!(rsm.machine().len(), 20_000, "every put applied once");
    // The snapshot holds the cap's worth of sessions, not every client ever seen.
    let (_, data) = rsm.snapshot();
    let decoded = pb::Snapshot::decode(data.as_ref()).expect("decode");
    assert_eq!(decoded.sessions.len(), 1_000);
}

#[test]
fn a_dropped_session_is_never_applied_twice() {
    let mut rsm = Rsm::with_policy(KvStore::default(), capped(2));
    let t = 1_800_000_000_000;
    let old = client_at(t, 1);
    let retry = append("k", "x");
    let Prepared::Propose(first_try) = rsm.prepare(old, 1, 0, &retry, t) else {
        panic!("no proposal")
    };
    rsm.apply_entries(&[entry(1, first_try.clone())])
        .expect("apply");
    // Two newer clients push the old session out.
    apply_one(&mut rsm, 1, client_at(t + 1, 2), 1, &put("a", "1"), t + 1);
    apply_one(&mut rsm, 2, client_at(t + 2, 3), 1, &put("b", "1"), t + 2);
    assert_eq!(rsm.sessions(), 2);
    // The old client's retry (it never heard back) is refused, both before and after the log...
    assert_eq!(
        rsm.prepare(old, 1, 0, &retry, t + 3),
        Prepared::Expired(old),
        "a retry after the session was dropped is refused up front"
    );
    rsm.track(7, 4, (old, 1, 0));
    let done = rsm.apply_entries(&[entry(4, first_try)]).expect("apply");
    assert_eq!(
        done,
        vec![Completion::SessionExpired {
            token: 7,
            min_client_id: old
        }]
    );
    // ... and the append happened exactly once.
    assert_eq!(get(&rsm, "k").as_deref(), Some("x"));
    // A client created later starts cleanly; one with an older id is told to move above the mark.
    assert!(matches!(
        rsm.prepare(client_at(t + 10, 4), 1, 0, &put("c", "1"), t + 10),
        Prepared::Propose(_)
    ));
    assert_eq!(
        rsm.prepare(client_at(t - 1, 9), 1, 0, &put("c", "1"), t + 10),
        Prepared::Expired(old)
    );
}

#[test]
fn idle_sessions_expire_by_the_leaders_clock_in_the_log_and_survive_snapshots() {
    let policy = LogPolicy {
        ttl_ms: 1_000,
        max_sessions: 0,
        quota_bytes: 0,
    };
    let mut rsm = Rsm::with_policy(KvStore::default(), policy);
    let t = 1_800_000_000_000;
    let idle = client_at(t, 1);
    apply_one(&mut rsm, 1, idle, 1, &put("a", "1"), t);
    apply_one(&mut rsm, 2, client_at(t, 2), 1, &put("b", "1"), t + 500);
    assert_eq!(rsm.sessions(), 2);
    // A snapshot keeps the table, the mark and the clock: a restored replica expires the same way.
    let (index, data) = rsm.snapshot();
    let mut restored = Rsm::with_policy(KvStore::default(), policy);
    restored
        .apply_snapshot(&Snapshot {
            meta: SnapshotMeta { index, term: 1 },
            data,
            membership: None,
        })
        .expect("restore");
    for replica in [&mut rsm, &mut restored] {
        apply_one(
            replica,
            3,
            client_at(t + 1_200, 3),
            1,
            &put("c", "1"),
            t + 1_200,
        );
        assert_eq!(replica.sessions(), 2, "the idle session went");
        assert_eq!(
            replica.prepare(idle, 2, 0, &put("a", "2"), t + 1_300),
            Prepared::Expired(idle)
        );
    }
    assert_eq!(
        rsm.snapshot(),
        restored.snapshot(),
        "replicas agree byte for byte"
    );
    // The log's clock never goes back, even under a leader whose clock is behind.
    apply_one(&mut rsm, 4, client_at(t, 5), 1, &put("d", "1"), t);
    assert_eq!(rsm.clock().now_ms, t + 1_200);
}

#[test]
fn a_failed_cas_on_a_large_value_keeps_a_small_record() {
    let mut rsm = Rsm::new(KvStore::default());
    let t = 1_800_000_000_000;
    let big = "v".repeat(crate::limits::MAX_VALUE_BYTES);
    apply_one(&mut rsm, 1, client_at(t, 1), 1, &put("k", &big), t);
    for n in 0..70 {
        let client = client_at(t, 100 + n);
        let cas = KvCommand::Cas {
            key: "k".into(),
            expected: Some("other".into()),
            value: "new".into(),
        };
        // The caller itself is told the whole current value...
        let Completion::Done { output, .. } = apply_one(&mut rsm, 10 + n, client, 1, &cas, t)
        else {
            panic!("cas not applied")
        };
        assert_eq!(output.value.as_deref().map(str::len), Some(big.len()));
        // ... a retry only that it failed.
        let Prepared::Answered(remembered) = rsm.prepare(client, 1, 0, &cas, t) else {
            panic!("retry not answered from the session table")
        };
        assert!(!remembered.ok && remembered.elided && remembered.value.is_none());
    }
    let (_, data) = rsm.snapshot();
    let sessions_bytes = data.len() - big.len();
    assert!(
        sessions_bytes < 71 * crate::limits::MAX_SESSION_RECORD_BYTES,
        "71 sessions take {sessions_bytes} bytes"
    );
}

#[test]
fn replicas_snapshots_are_byte_identical() {
    let t = 1_800_000_000_000;
    let mut replicas: Vec<Rsm<KvStore>> = (0..3).map(|_| Rsm::new(KvStore::default())).collect();
    let leader = Rsm::new(KvStore::default());
    let entries: Vec<Entry> = (0..500u64)
        .map(|n| {
            let command = put(&format!("key-{}", (n * 7919) % 263), &format!("value-{n}"));
            let Prepared::Propose(data) =
                leader.prepare(client_at(t, n % 37 + 1), n + 1, 0, &command, t + n)
            else {
                panic!("no proposal")
            };
            entry(n + 1, data)
        })
        .collect();
    // Each replica applies the log in differently sized batches.
    for (r, replica) in replicas.iter_mut().enumerate() {
        for batch in entries.chunks(r * 50 + 1) {
            replica.apply_entries(batch).expect("apply");
        }
    }
    let snapshots: Vec<_> = replicas.iter().map(Rsm::snapshot).collect();
    assert!(snapshots.windows(2).all(|w| w[0] == w[1]));
}

/// A caller cannot write under another identity's client id (the attacker review's MEDIUM): before
/// owners, a command with the victim's id and a sequence number far ahead was applied and recorded,
/// so the victim's next writes looked like retries of older commands and were never applied. Now the
/// entry carries its sender's owner, every replica refuses it at apply as an expired session (even one
/// a stale leader let into the log), and the owner survives a snapshot.
#[test]
fn a_session_takes_commands_only_from_the_identity_that_opened_it() {
    let (victim, attacker) = (0xA11CE, 0xBAD);
    let mut leader = Rsm::new(KvStore::default());
    let mut other = Rsm::new(KvStore::default());
    let client = client_at(1_000, 1);
    let first = match leader.prepare(client, 1, victim, &put("k", "victim 1"), 1_000) {
        Prepared::Propose(data) => data,
        other => panic!("{other:?}"),
    };
    // The forgery, as a leader that had not yet applied the victim's first command would propose it.
    let forged = match leader.prepare(client, 1_000_000, attacker, &put("k", "forged"), 1_001) {
        Prepared::Propose(data) => data,
        other => panic!("{other:?}"),
    };
    for rsm in [&mut leader, &mut other] {
        rsm.apply_entries(&[entry(1, first.clone()), entry(2, forged.clone())])
            .expect("apply");
        assert_eq!(
            get(rsm, "k").as_deref(),
            Some("victim 1"),
            "forgery applied"
        );
    }
    // The leader now refuses it before the log, and answers no retry of the victim's output to it.
    assert_eq!(
        leader.prepare(client, 1_000_000, attacker, &put("k", "forged"), 1_002),
        Prepared::Expired(client)
    );
    assert_eq!(
        leader.prepare(client, 1, attacker, &put("k", "victim 1"), 1_002),
        Prepared::Expired(client)
    );
    // The victim goes on, on a replica restored from the leader's snapshot too.
    let (index, data) = leader.snapshot();
    other = Rsm::new(KvStore::default());
    other
        .apply_snapshot(&Snapshot {
            meta: SnapshotMeta { index, term: 1 },
            data,
            membership: None,
        })
        .expect("restore");
    assert_eq!(
        other.prepare(client, 2, attacker, &put("k", "forged"), 1_003),
        Prepared::Expired(client),
        "the owner was lost in the snapshot"
    );
    let second = match other.prepare(client, 2, victim, &put("k", "victim 2"), 1_003) {
        Prepared::Propose(data) => data,
        other => panic!("{other:?}"),
    };
    other
        .apply_entries(&[entry(index + 1, second)])
        .expect("apply");
    assert_eq!(get(&other, "k").as_deref(), Some("victim 2"));
}

/// The quota is the log's, like the session policy: a replica started with another (or none) refuses
/// the same writes as the leader that stamped them, and a retry of a refused write is told it was
/// refused (from its dedup record), not applied then.
#[test]
fn the_quota_stamped_in_the_log_decides_on_every_replica() {
    let with_quota = LogPolicy {
        quota_bytes: 16 + crate::kv::state::KEY_OVERHEAD_BYTES,
        ..LogPolicy::KEEP_ALL
    };
    let mut leader = Rsm::with_policy(KvStore::default(), with_quota);
    let mut follower = Rsm::with_policy(KvStore::default(), LogPolicy::KEEP_ALL);
    let first = proposal(&leader, 7, 1, &put("a", "123456789"));
    let second = proposal(&leader, 7, 2, &put("b", "123456789"));
    for rsm in [&mut leader, &mut follower] {
        rsm.apply_entries(&[entry(1, first.clone()), entry(2, second.clone())])
            .expect("apply");
        assert_eq!(get(rsm, "a").as_deref(), Some("123456789"));
        assert_eq!(get(rsm, "b"), None, "a write past the quota was applied");
        let Prepared::Answered(retried) = rsm.prepare(7, 2, 0, &put("b", "123456789"), 2) else {
            panic!("the refused write is not remembered")
        };
        assert!(retried.over_quota && !retried.ok, "{retried:?}");
    }
    // Entries stamped without a quota (an older leader, or --quota-bytes 0) are not bounded.
    let unbounded = proposal(&follower, 7, 3, &put("c", &"x".repeat(100)));
    for rsm in [&mut leader, &mut follower] {
        rsm.apply_entries(&[entry(3, unbounded.clone())])
            .expect("apply");
        assert_eq!(get(rsm, "c").map(|v| v.len()), Some(100));
    }
}

/// A proposal learns its own entry's outcome, never that of another identity's entry under the same
/// client id and number (review of the owner change): with both applied before either proposer
/// tracked its index, the attacker's track used to take the one shared expectation, and the
/// victim's write — refused at apply — was then answered from the attacker's session as done.
#[test]
fn a_proposal_learns_its_own_outcome_not_anothers_under_the_same_id() {
    let (victim, attacker, client) = (0xA11CE, 0xBAD, 7);
    let mut rsm = Rsm::new(KvStore::default());
    let propose =
        |rsm: &Rsm<KvStore>, owner, value| match rsm.prepare(client, 1, owner, &put("k", value), 1)
        {
            Prepared::Propose(data) => data,
            other => panic!("{other:?}"),
        };
    let forged = propose(&rsm, attacker, "forged");
    let honest = propose(&rsm, victim, "honest");
    rsm.expect(client, 1, attacker);
    rsm.expect(client, 1, victim);
    rsm.apply_entries(&[entry(1, forged), entry(2, honest)])
        .expect("apply");
    assert!(matches!(
        rsm.track(1, 1, (client, 1, attacker)),
        Some(Completion::Done { .. })
    ));
    assert_eq!(
        rsm.track(2, 2, (client, 1, victim)),
        Some(Completion::SessionExpired {
            token: 2,
            min_client_id: client
        })
    );
    // Tracked with no expectation left (as after a snapshot): not the attacker's outcome either.
    assert_eq!(
        rsm.track(3, 2, (client, 1, victim)),
        Some(Completion::Retry { token: 3 })
    );
}
