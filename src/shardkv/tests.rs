use super::*;
use crate::ctrler::{Config, Gid, Groups};
use crate::kv::{KvCommand, KvOutput};
use crate::rsm::StateMachine;

fn config(num: u64, shards: &[u64]) -> Config {
    let groups: Groups = shards
        .iter()
        .filter(|&&g| g != 0)
        .map(|&g| (g, vec![format!("g{g}-a"), format!("g{g}-b")]))
        .collect();
    Config {
        num,
        shards: shards.to_vec(),
        groups,
    }
}

fn key_in(shard: ShardId, shards: usize) -> String {
    (0..)
        .map(|i| format!("k{i}"))
        .find(|k| key_to_shard(k, shards) == shard)
        .unwrap_or_default()
}

fn put(client: u64, seq: u64, key: &str, value: &str) -> ShardCommand {
    ShardCommand::Client {
        client,
        seq,
        owner: 0,
        command: KvCommand::Append {
            key: key.into(),
            value: value.into(),
        },
    }
}

fn ok() -> ShardOutput {
    ShardOutput::Kv(KvOutput {
        ok: true,
        value: None,
        elided: false,
        over_quota: false,
    })
}

fn get(machine: &ShardKv, key: &str) -> ShardOutput {
    machine.query(&ShardQuery::Get(key.into()))
}

#[test]
fn keys_spread_over_shards_and_the_mapping_is_stable() {
    let mut counts = [0usize; 10];
    for i in 0..1000 {
        counts[key_to_shard(&format!("key{i}"), 10) as usize] += 1;
    }
    assert!(counts.iter().all(|&c| c > 50), "{counts:?}");
    // Pinned: stored data depends on this mapping never changing.
    assert_eq!(key_to_shard("", 10), 0xcbf2_9ce4_8422_2325 % 10);
    assert_eq!(key_to_shard("a", 10), 0xaf63_dc4c_8601_ec8c % 10);
    assert_eq!(key_to_shard("x", 0), 0);
}

#[test]
fn serves_only_owned_shards_and_moves_through_configs_in_order() {
    let mut g1 = ShardKv::new(1);
    let k0 = key_in(0, 2);
    let k1 = key_in(1, 2);
    assert_eq!(g1.apply(put(7, 1, &k0, "x")), ShardOutput::WrongGroup);
    assert_eq!(g1.duties(), vec![Duty::FetchConfig { num: 1 }]);
    // Skipping a configuration is refused.
    assert_eq!(
        g1.apply(ShardCommand::NextConfig(config(2, &[1, 1]))),
        ShardOutput::Ignored
    );
    assert_eq!(g1.apply(ShardCommand::NextConfig(config(1, &[1, 1]))), ok());
    assert_eq!(g1.serving(), vec![0, 1], "shards from group 0 start empty");
    assert_eq!(g1.apply(put(7, 1, &k0, "x")), ok());
    assert_eq!(g1.apply(put(7, 2, &k1, "y")), ok());
    // A retried request is answered, not applied again.
    assert_eq!(g1.apply(put(7, 2, &k1, "y")), ok());
    assert_eq!(
        get(&g1, &k1),
        ShardOutput::Kv(KvOutput {
            ok: true,
            value: Some("y".into()),
            elided: false,
            over_quota: false,
        })
    );

    // Configuration 2 gives shard 1 to group 2: group 1 freezes it and keeps serving shard 0.
    assert_eq!(g1.apply(ShardCommand::NextConfig(config(2, &[1, 2]))), ok());
    assert_eq!(get(&g1, &k1), ShardOutput::WrongGroup);
    assert_eq!(g1.apply(put(7, 3, &k1, "z")), ShardOutput::WrongGroup);
    assert_eq!(g1.apply(put(7, 3, &k0, "z")), ok());
    assert_eq!(g1.outgoing(), vec![(2, 1)]);

    // Group 2 moves to configuration 1 (nothing), then 2, where it must pull shard 1.
    let mut g2 = ShardKv::new(2);
    g2.apply(ShardCommand::NextConfig(config(1, &[1, 1])));
    g2.apply(ShardCommand::NextConfig(config(2, &[1, 2])));
    assert_eq!(g2.pulling(), vec![1]);
    assert_eq!(get(&g2, &k1), ShardOutput::WrongGroup, "not arrived yet");
    let pull = g2.duties();
    assert!(
        matches!(&pull[..], [Duty::Pull { config_num: 2, shard: 1, from, after: Cursor::Keys(None) }] if from.gid == 1),
        "{pull:?}"
    );
    // A group does not take the next configuration while a shard is missing.
    assert_eq!(
        g2.apply(ShardCommand::NextConfig(config(3, &[2, 2]))),
        ShardOutput::Ignored
    );
    // The previous owner answers the pull only once it reached the configuration.
    assert_eq!(
        g1.apply(ShardCommand::Pull {
            config_num: 3,
            shard: 1,
            after: Cursor::Keys(None),
            by: Some(2),
            session_pages: true,
        }),
        ShardOutput::NotReady
    );
    let ShardOutput::Pulled(data) = g1.apply(ShardCommand::Pull {
        config_num: 2,
        shard: 1,
        after: Cursor::Keys(None),
        by: Some(2),
        session_pages: true,
    }) else {
        panic!("pull refused")
    };
    assert_eq!(g2.apply(ShardCommand::Install(data.clone())), ok());
    // A duplicate install (a second pull's result) changes nothing.
    assert_eq!(g2.apply(ShardCommand::Install(data)), ShardOutput::Ignored);
    assert_eq!(
        get(&g2, &k1),
        ShardOutput::Kv(KvOutput {
            ok: true,
            value: Some("y".into()),
            elided: false,
            over_quota: false,
        })
    );
    // The dedup record came along: the client's retry of seq 2 is not applied twice.
    assert_eq!(g2.apply(put(7, 2, &k1, "y")), ok());
    assert_eq!(
        get(&g2, &k1),
        ShardOutput::Kv(KvOutput {
            ok: true,
            value: Some("y".into()),
            elided: false,
            over_quota: false,
        })
    );
    // Now group 2 owes group 1 a delete; group 1 drops its copy; group 2 records the confirmation.
    assert!(g2
        .duties()
        .iter()
        .any(|d| matches!(d, Duty::Delete { config_num: 2, shard: 1, to } if to.gid == 1)));
    assert_eq!(g1.outgoing(), vec![(2, 1)]);
    assert_eq!(
        g2.confirming(),
        vec![(2, 1)],
        "status shows the delete owed"
    );
    assert_eq!(
        g1.apply(ShardCommand::DropOutgoing {
            config_num: 2,
            shard: 1,
            by: Some(2),
        }),
        ShardOutput::Dropped
    );
    assert!(g1.outgoing().is_empty());
    // A retried delete (its answer was lost) is answered the same way again.
    assert_eq!(
        g1.apply(ShardCommand::DropOutgoing {
            config_num: 2,
            shard: 1,
            by: Some(2),
        }),
        ShardOutput::Dropped
    );
    assert_eq!(
        g2.apply(ShardCommand::Confirmed {
            config_num: 2,
            shard: 1
        }),
        ShardOutput::Dropped
    );
    assert!(g2.confirming().is_empty());
    assert_eq!(g2.duties(), vec![Duty::FetchConfig { num: 3 }]);
}

#[test]
fn snapshot_round_trips_every_part_and_refuses_another_group() {
    let mut g1 = ShardKv::new(1);
    g1.apply(ShardCommand::NextConfig(config(1, &[1, 1, 1])));
    let k2 = key_in(2, 3);
    g1.apply(put(3, 1, &k2, "v"));
    g1.apply(ShardCommand::NextConfig(config(2, &[1, 2, 2])));
    let mut g2 = ShardKv::new(2);
    g2.apply(ShardCommand::NextConfig(config(1, &[1, 1, 1])));
    g2.apply(ShardCommand::NextConfig(config(2, &[1, 2, 2])));
    let ShardOutput::Pulled(data) = g1.apply(ShardCommand::Pull {
        config_num: 2,
        shard: 2,
        after: Cursor::Keys(None),
        by: Some(2),
        session_pages: true,
    }) else {
        panic!("pull refused")
    };
    g2.apply(ShardCommand::Install(data));

    for machine in [&g1, &g2] {
        let mut restored = ShardKv::new(machine.gid());
        restored.restore(&machine.snapshot()).expect("restore");
        assert_eq!(restored.snapshot(), machine.snapshot());
        assert_eq!(restored.duties(), machine.duties());
        assert_eq!(restored.outgoing(), machine.outgoing());
        assert_eq!(get(&restored, &k2), get(machine, &k2));
    }
    let err = ShardKv::new(9).restore(&g1.snapshot()).unwrap_err();
    assert!(err.to_string().contains("group 1"), "{err}");
    for command in [
        put(3, 9, "k", "v"),
        ShardCommand::NextConfig(config(4, &[1, 2, 2])),
        ShardCommand::DropOutgoing {
            config_num: 2,
            shard: 1,
            by: Some(2),
        },
        ShardCommand::DropOutgoing {
            config_num: 2,
            shard: 1,
            by: None,
        },
        ShardCommand::Pull {
            config_num: 2,
            shard: 1,
            after: Cursor::Sessions(Some(4)),
            by: Some(7),
            session_pages: true,
        },
        ShardCommand::Pull {
            config_num: 2,
            shard: 1,
            after: Cursor::Keys(Some("k".into())),
            by: None,
            session_pages: false,
        },
    ] {
        let bytes = ShardKv::encode_command(&command);
        assert_eq!(ShardKv::decode_command(&bytes), Ok(command));
    }
    assert!(ShardKv::decode_command(b"\xff\xff").is_err());
}

#[test]
fn a_large_shard_moves_in_bounded_pages_applied_in_order() {
    let mut g1 = ShardKv::new(1);
    g1.apply(ShardCommand::NextConfig(config(1, &[1])));
    let value = "v".repeat(PAGE_BYTES / 3);
    for i in 0..10 {
        let key = format!("key{i:02}");
        assert_eq!(
            g1.apply(ShardCommand::Client {
                client: 5,
                seq: i + 1,
                owner: 0,
                command: KvCommand::Put {
                    key,
                    value: value.clone(),
                },
            }),
            ok()
        );
    }
    g1.apply(ShardCommand::NextConfig(config(2, &[2])));
    let mut g2 = ShardKv::new(2);
    g2.apply(ShardCommand::NextConfig(config(1, &[1])));
    g2.apply(ShardCommand::NextConfig(config(2, &[2])));

    let mut pages = Vec::new();
    loop {
        let duty = g2.duties().remove(0);
        let Duty::Pull { after, .. } = duty else {
            break;
        };
        let ShardOutput::Pulled(page) = g1.apply(ShardCommand::Pull {
            config_num: 2,
            shard: 0,
            after,
            by: Some(2),
            session_pages: true,
        }) else {
            panic!("pull refused")
        };
        let bytes: usize = page.data.iter().map(|(k, v)| k.len() + v.len()).sum();
        assert!(bytes <= 2 * PAGE_BYTES, "page of {bytes} bytes");
        assert_eq!(
            page.sessions.is_empty(),
            !page.last,
            "the one record rides on the page that ends the keys"
        );
        if let Some(previous) = pages.last() {
            // A page that is not next (a duplicate from a retried pull) is ignored.
            assert_eq!(
                g2.apply(ShardCommand::Install(Clone::clone(previous))),
                ShardOutput::Ignored
            );
        }
        if !page.last {
            assert_eq!(get(&g2, "key00"), ShardOutput::WrongGroup, "partial shard");
        }
        assert_eq!(g2.apply(ShardCommand::Install(page.clone())), ok());
        pages.push(page);
        // A restart in the middle resumes from the snapshot's cursor.
        let mut restored = ShardKv::new(2);
        restored.restore(&g2.snapshot()).expect("restore");
        assert_eq!(restored.duties(), g2.duties());
    }
    assert!(pages.len() >= 3, "{} pages", pages.len());
    assert_eq!(g2.serving(), vec![0]);
    for i in 0..10 {
        assert_eq!(
            get(&g2, &format!("key{i:02}")),
            ShardOutput::Kv(KvOutput {
                ok: true,
                value: Some(value.clone()),
                elided: false,
                over_quota: false,
            })
        );
    }
    // The dedup records arrived with the last page.
    assert_eq!(
        g2.apply(ShardCommand::Client {
            client: 5,
            seq: 10,
            owner: 0,
            command: KvCommand::Append {
                key: "key09".into(),
                value: "again".into(),
            },
        }),
        ok()
    );
    assert_eq!(
        get(&g2, "key09"),
        ShardOutput::Kv(KvOutput {
            ok: true,
            value: Some(value.clone()),
            elided: false,
            over_quota: false,
        })
    );
    // Pages survive the wire and the log.
    let last = pages.pop().expect("pages");
    let bytes = ShardKv::encode_command(&ShardCommand::Install(last.clone()));
    assert_eq!(
        ShardKv::decode_command(&bytes),
        Ok(ShardCommand::Install(last))
    );
}

#[test]
fn shards_left_with_nobody_are_found_at_their_last_owner() {
    let k0 = key_in(0, 2);
    let history = [config(1, &[1, 1]), config(2, &[0, 0])];
    let mut g1 = ShardKv::new(1);
    g1.apply(ShardCommand::NextConfig(history[0].clone()));
    assert_eq!(g1.apply(put(7, 1, &k0, "kept")), ok());
    // Every group leaves: group 1 freezes its shards; nobody will pull them yet.
    g1.apply(ShardCommand::NextConfig(history[1].clone()));
    assert_eq!(g1.outgoing(), vec![(2, 0), (2, 1)]);

    // Group 2 joins in configuration 3 and gains both shards from nobody.
    let mut g2 = ShardKv::new(2);
    for c in &history {
        g2.apply(ShardCommand::NextConfig(c.clone()));
    }
    g2.apply(ShardCommand::NextConfig(config(3, &[2, 2])));
    assert_eq!(get(&g2, &k0), ShardOutput::WrongGroup, "not empty-served");
    assert!(g2.duties().contains(&Duty::FindOwner {
        shard: 0,
        before: 3
    }));
    let (config_num, source) = last_owner(0, &history).expect("group 1 owned it");
    assert_eq!((config_num, source.gid), (2, 1));
    assert_eq!(last_owner(0, &history[1..]), None);
    assert_eq!(
        g2.apply(ShardCommand::Adopt {
            shard: 0,
            config_num,
            source: Some(source),
        }),
        ok()
    );
    let Some(Duty::Pull {
        config_num: 2,
        after: Cursor::Keys(None),
        ..
    }) = g2
        .duties()
        .into_iter()
        .find(|d| matches!(d, Duty::Pull { shard: 0, .. }))
    else {
        panic!("no pull from the last owner: {:?}", g2.duties())
    };
    // The last owner hands the shard over only once it knows the configuration naming its adopter.
    let early = ShardCommand::Pull {
        config_num: 2,
        shard: 0,
        after: Cursor::Keys(None),
        by: Some(2),
        session_pages: true,
    };
    assert_eq!(g1.apply(early), ShardOutput::NotReady);
    g1.apply(ShardCommand::NextConfig(config(3, &[2, 2])));
    let ShardOutput::Pulled(page) = g1.apply(ShardCommand::Pull {
        config_num: 2,
        shard: 0,
        after: Cursor::Keys(None),
        by: Some(2),
        session_pages: true,
    }) else {
        panic!("pull refused")
    };
    assert_eq!(g2.apply(ShardCommand::Install(page)), ok());
    assert_eq!(
        get(&g2, &k0),
        ShardOutput::Kv(KvOutput {
            ok: true,
            value: Some("kept".into()),
            elided: false,
            over_quota: false,
        })
    );
    // A shard nobody ever held (no owner in the history) starts empty once adopted from nowhere.
    assert_eq!(
        g2.apply(ShardCommand::Adopt {
            shard: 1,
            config_num: 0,
            source: None,
        }),
        ok()
    );
    assert_eq!(g2.serving(), vec![0, 1]);
    let bytes = ShardKv::encode_command(&ShardCommand::Adopt {
        shard: 1,
        config_num: 2,
        source: Some(Source {
            gid: 1,
            servers: vec!["a".into()],
        }),
    });
    assert!(matches!(
        ShardKv::decode_command(&bytes),
        Ok(ShardCommand::Adopt { shard: 1, config_num: 2, source: Some(s) }) if s.gid == 1
    ));
}

fn pull(machine: &mut ShardKv, after: Option<&str>, by: Option<Gid>) -> ShardOutput {
    pull_at(machine, Cursor::Keys(after.map(String::from)), by)
}

fn pull_at(machine: &mut ShardKv, after: Cursor, by: Option<Gid>) -> ShardOutput {
    machine.apply(ShardCommand::Pull {
        config_num: 2,
        shard: 0,
        after,
        by,
        session_pages: true,
    })
}

fn drop_copy(machine: &mut ShardKv, by: Option<Gid>) -> ShardOutput {
    machine.apply(ShardCommand::DropOutgoing {
        config_num: 2,
        shard: 0,
        by,
    })
}

#[test]
fn a_frozen_copy_goes_only_to_its_new_owner_and_only_after_its_final_page() {
    let mut g1 = ShardKv::new(1);
    g1.apply(ShardCommand::NextConfig(config(1, &[1])));
    let value = "v".repeat(PAGE_BYTES);
    for (seq, key) in ["a", "b"].into_iter().enumerate() {
        let command = ShardCommand::Client {
            client: 5,
            seq: seq as u64 + 1,
            owner: 0,
            command: KvCommand::Put {
                key: key.into(),
                value: value.clone(),
            },
        };
        assert_eq!(g1.apply(command), ok());
    }
    g1.apply(ShardCommand::NextConfig(config(2, &[2])));

    // Nobody has had the final page: a delete, even from the new owner, keeps the copy.
    for by in [Some(2), None] {
        assert_eq!(drop_copy(&mut g1, by), ShardOutput::NotReady);
    }
    // Another group may neither read nor delete it.
    assert_eq!(pull(&mut g1, None, Some(3)), ShardOutput::NotOwner(2));
    assert_eq!(drop_copy(&mut g1, Some(3)), ShardOutput::NotOwner(2));
    // The new owner's first page is not the last: still no delete.
    let ShardOutput::Pulled(first) = pull(&mut g1, None, Some(2)) else {
        panic!("the new owner was refused")
    };
    assert!(!first.last);
    assert_eq!(drop_copy(&mut g1, Some(2)), ShardOutput::NotReady);
    // The page that ends the keys is full: the dedup record follows on a page of its own, the last.
    let ShardOutput::Pulled(second) = pull_at(&mut g1, first.next_cursor(), Some(2)) else {
        panic!("the new owner was refused")
    };
    assert!(second.keys_done && second.sessions.is_empty() && !second.last);
    assert_eq!(drop_copy(&mut g1, Some(2)), ShardOutput::NotReady);
    let ShardOutput::Pulled(last) = pull_at(&mut g1, second.next_cursor(), Some(2)) else {
        panic!("the new owner was refused")
    };
    assert!(last.last && last.data.is_empty());
    assert_eq!(last.sessions.len(), 1);
    // The record of the final page survives a snapshot, and still only the owner may delete.
    let mut restored = ShardKv::new(1);
    restored.restore(&g1.snapshot()).expect("restore");
    assert_eq!(drop_copy(&mut restored, Some(3)), ShardOutput::NotOwner(2));
    assert_eq!(restored.outgoing(), vec![(2, 0)]);
    assert_eq!(drop_copy(&mut restored, Some(2)), ShardOutput::Dropped);
    assert!(restored.outgoing().is_empty());
}

#[test]
fn a_copy_given_to_nobody_belongs_to_the_group_that_gets_the_shard_next() {
    let mut g1 = ShardKv::new(1);
    g1.apply(ShardCommand::NextConfig(config(1, &[1])));
    g1.apply(ShardCommand::NextConfig(config(2, &[0])));
    // While nobody has the shard, nobody may take it: the adopter is not known here yet, and anybody
    // could otherwise take and delete the only copy.
    for by in [Some(4), None] {
        assert_eq!(pull(&mut g1, None, by), ShardOutput::NotReady);
        assert_eq!(drop_copy(&mut g1, by), ShardOutput::NotReady);
    }
    // ...but once a configuration gives it to group 3, only group 3 may.
    g1.apply(ShardCommand::NextConfig(config(3, &[3])));
    g1.apply(ShardCommand::NextConfig(config(4, &[4])));
    assert_eq!(pull(&mut g1, None, Some(4)), ShardOutput::NotOwner(3));
    assert!(matches!(
        pull(&mut g1, None, Some(3)),
        ShardOutput::Pulled(_)
    ));
    assert_eq!(drop_copy(&mut g1, Some(4)), ShardOutput::NotOwner(3));
    assert_eq!(drop_copy(&mut g1, Some(3)), ShardOutput::Dropped);
}

#[test]
fn a_group_that_owns_nothing_may_jump_over_configurations_the_controllers_dropped() {
    // A new group: configurations 1..=6 were dropped; 7 gives it nothing, 8 gives it shard 1.
    let mut g2 = ShardKv::new(2);
    assert!(g2.can_jump_to(&config(7, &[1, 1])));
    assert_eq!(g2.apply(ShardCommand::NextConfig(config(7, &[1, 1]))), ok());
    assert_eq!(g2.config().num, 7);
    // Never to a configuration that gives it a shard: it must gain shards one step at a time.
    assert!(!g2.can_jump_to(&config(9, &[1, 2])));
    assert_eq!(
        g2.apply(ShardCommand::NextConfig(config(9, &[1, 2]))),
        ShardOutput::Ignored
    );
    assert_eq!(g2.apply(ShardCommand::NextConfig(config(8, &[1, 2]))), ok());
    assert_eq!(g2.pulling(), vec![1]);
    // Never while it owns a shard, nor (once it has given it away) while its copy waits for a
    // configuration to name a taker.
    assert!(!g2.can_jump_to(&config(20, &[1, 1])));
    let mut g1 = ShardKv::new(1);
    assert_eq!(g1.apply(ShardCommand::NextConfig(config(1, &[1, 1]))), ok());
    assert_eq!(g1.apply(ShardCommand::NextConfig(config(2, &[0, 0]))), ok());
    assert_eq!(g1.outgoing().len(), 2);
    assert!(!g1.can_jump_to(&config(9, &[3, 3])));
    // The answer "configuration 3 was dropped, the oldest kept is 9" makes no command for it.
    let duty = Duty::FetchConfig { num: 3 };
    assert!(matches!(
        migration::command(&g1, &duty, migration::Answer::Compacted(config(9, &[3, 3]))),
        Err(migration::Mismatch::Compacted {
            wanted: 3,
            oldest: 9
        })
    ));
    let fresh = ShardKv::new(5);
    assert_eq!(
        migration::command(
            &fresh,
            &Duty::FetchConfig { num: 1 },
            migration::Answer::Compacted(config(9, &[3, 3]))
        ),
        Ok(ShardCommand::NextConfig(config(9, &[3, 3])))
    );
}

/// Group 1 holding, frozen for group 2 in configuration 2, a one-shard table of `clients` sessions
/// beyond those its policy keeps (the oldest are dropped, so the table has a mark): each client's
/// record is a failed compare-and-swap that remembers the longest value a record keeps, sent by an
/// identity whose owner is the client's id. Client `clients` last appended "a" to "log". Group 2 is at
/// configuration 2, pulling the shard.
fn groups_with_many_sessions(clients: u64, kept: u64) -> (ShardKv, ShardKv) {
    use crate::rsm::sessions::{LogClock, LogPolicy};
    let mut g1 = ShardKv::new(1);
    g1.apply(ShardCommand::NextConfig(config(1, &[1])));
    g1.observe_clock(&LogClock {
        now_ms: 1,
        policy: Some(LogPolicy {
            ttl_ms: 0,
            max_sessions: kept,
            quota_bytes: 0,
        }),
    });
    let long = "x".repeat(crate::limits::MAX_REMEMBERED_VALUE_BYTES);
    assert_eq!(g1.apply(put(1, 1, "held", &long)), ok());
    for client in 2..clients {
        let cas = ShardCommand::Client {
            client,
            seq: 1,
            owner: client,
            command: KvCommand::Cas {
                key: "held".into(),
                expected: Some("something else".into()),
                value: "v".into(),
            },
        };
        assert!(matches!(
            g1.apply(cas),
            ShardOutput::Kv(KvOutput { ok: false, .. })
        ));
    }
    assert_eq!(g1.apply(put(clients, 1, "log", "a")), ok());
    g1.apply(ShardCommand::NextConfig(config(2, &[2])));
    let mut g2 = ShardKv::new(2);
    g2.apply(ShardCommand::NextConfig(config(1, &[1])));
    g2.apply(ShardCommand::NextConfig(config(2, &[2])));
    (g1, g2)
}

#[test]
fn a_shard_with_many_sessions_moves_its_records_in_bounded_pages() {
    const CLIENTS: u64 = 30_000;
    let (mut g1, mut g2) = groups_with_many_sessions(CLIENTS, CLIENTS - 100);
    let frozen = g1.outgoing[&(2, 0)].contents.dedup.clone();
    assert_eq!(frozen.len() as u64, CLIENTS - 100);
    assert!(frozen.evicted_max() > 0);
    // Encoded, the whole table is megabytes: far more than a page may be (the bound is well below the
    // largest page of the previous version, which carried it all: PAGE_BYTES + MAX_KEY_BYTES +
    // MAX_VALUE_BYTES + MAX_SESSIONS x MAX_SESSION_RECORD_BYTES, about 15 MB).
    let bound = PAGE_BYTES + (64 << 10);
    let whole_shard =
        prost::Message::encoded_len(&wire::shard_to_proto(&g1.outgoing[&(2, 0)].contents));
    assert!(whole_shard > 2 * bound, "{whole_shard} bytes");

    let mut pages = 0;
    while let Some(duty) = g2
        .duties()
        .into_iter()
        .find(|d| matches!(d, Duty::Pull { .. }))
    {
        let migration::Request::Pull { request, .. } = migration::request(&duty) else {
            panic!("{duty:?} is not a pull")
        };
        let ShardOutput::Pulled(page) = g1.apply(migration::serve_pull(&request, Some(2))) else {
            panic!("pull refused")
        };
        let encoded = ShardKv::encode_command(&ShardCommand::Install(page.clone())).len();
        assert!(encoded <= bound, "page {pages} is {encoded} bytes");
        assert!(page.sessions.len() <= crate::limits::SESSION_PAGE_RECORDS);
        let install = migration::command(&g2, &duty, migration::Answer::Page(page.clone()))
            .expect("the page passes check_page");
        if !page.last {
            // Neither side is done: no client is served a partial table, and the copy stays.
            assert_eq!(get(&g2, "log"), ShardOutput::WrongGroup);
            assert_eq!(drop_copy(&mut g1, Some(2)), ShardOutput::NotReady);
        }
        assert_eq!(g2.apply(install.clone()), ok());
        // A duplicated page (a retried pull) is ignored.
        assert_eq!(g2.apply(install), ShardOutput::Ignored);
        // A restart resumes from the snapshot's cursor, among the records too.
        let mut restored = ShardKv::new(2);
        restored.restore(&g2.snapshot()).expect("restore");
        assert_eq!(restored.duties(), g2.duties());
        pages += 1;
    }
    assert!(pages >= 4, "{pages} pages");
    assert_eq!(g2.serving(), vec![0]);
    // The new owner has exactly the old owner's records (their owners too, through a snapshot), and
    // the copy may go.
    let mut g2 = {
        let mut restored = ShardKv::new(2);
        restored.restore(&g2.snapshot()).expect("restore");
        restored
    };
    assert_eq!(g2.shards[&0].contents.dedup, frozen);
    assert_eq!(drop_copy(&mut g1, Some(2)), ShardOutput::Dropped);

    // Exactly-once survives the move: a retried append is answered from its record, not applied again.
    assert_eq!(g2.apply(put(CLIENTS, 1, "log", "a")), ok());
    assert_eq!(
        get(&g2, "log"),
        ShardOutput::Kv(KvOutput {
            ok: true,
            value: Some("a".into()),
            elided: false,
            over_quota: false,
        })
    );
    // A retried failed swap is told what it was told; a dropped client's retry is refused, not applied.
    let cas = |client, owner| ShardCommand::Client {
        client,
        seq: 1,
        owner,
        command: KvCommand::Cas {
            key: "held".into(),
            expected: Some("x".repeat(crate::limits::MAX_REMEMBERED_VALUE_BYTES)),
            value: "swapped".into(),
        },
    };
    let ShardOutput::Kv(retried) = g2.apply(cas(CLIENTS - 1, CLIENTS - 1)) else {
        panic!("the retry was not answered")
    };
    assert!(!retried.ok, "a retry swapped");
    assert_eq!(
        g2.apply(cas(2, 2)),
        ShardOutput::SessionExpired(frozen.evicted_max())
    );
    // The session moved with its owner: another identity using the id is refused, and swaps nothing.
    assert_eq!(
        g2.apply(cas(CLIENTS - 1, 7)),
        ShardOutput::SessionExpired(CLIENTS - 1)
    );
    assert!(
        matches!(get(&g2, "held"), ShardOutput::Kv(KvOutput { value: Some(v), .. }) if v.starts_with('x'))
    );
}

#[test]
fn a_puller_of_the_previous_version_gets_every_record_on_the_page_ending_the_keys() {
    let (mut g1, _) = groups_with_many_sessions(20_000, 20_000);
    let old_style = ShardCommand::Pull {
        config_num: 2,
        shard: 0,
        after: Cursor::Keys(None),
        by: Some(2),
        session_pages: false,
    };
    let ShardOutput::Pulled(page) = g1.apply(old_style) else {
        panic!("pull refused")
    };
    assert!(page.last && page.keys_done);
    assert_eq!(page.sessions.len(), 20_000);
    assert_eq!(drop_copy(&mut g1, Some(2)), ShardOutput::Dropped);
}

#[test]
fn snapshots_and_entries_written_before_session_pages_still_apply() {
    use crate::proto::shardkv as pb;
    use prost::Message as _;
    // A snapshot of the previous version, byte for byte: group 2 pulling shard 0 from group 1, every
    // key up to "k" installed (OwnedShard: pulling, from_gid 1, cursor "k").
    let snapshot = [
        0x08, 0x02, 0x1a, 0x07, 0x10, 0x01, 0x18, 0x01, 0x32, 0x01, b'k',
    ];
    let mut g2 = ShardKv::new(2);
    g2.restore(&snapshot).expect("an old snapshot decodes");
    assert!(matches!(
        &g2.duties()[..],
        [Duty::Pull { shard: 0, after: Cursor::Keys(Some(k)), from, .. }] if k == "k" && from.gid == 1
    ));
    // A `Pull` entry of the previous version (Transfer: configuration 2, after "k", by group 2) is
    // served as that version served it.
    let pull = [0x3a, 0x07, 0x08, 0x02, 0x1a, 0x01, b'k', 0x20, 0x02];
    assert_eq!(
        ShardKv::decode_command(&pull),
        Ok(ShardCommand::Pull {
            config_num: 2,
            shard: 0,
            after: Cursor::Keys(Some("k".into())),
            by: Some(2),
            session_pages: false,
        })
    );
    // Its final page, as an `Install` entry: keys, then every record, no `keys_done`.
    let install = pb::Command {
        op: Some(pb::command::Op::Install(pb::ShardData {
            config_num: 0,
            shard: 0,
            data: [("l".to_string(), "v".to_string())].into(),
            dedup: vec![pb::Dedup {
                client_id: 7,
                seq: 3,
                outcome: Some(Default::default()),
                last_ms: 0,
                owner: 0,
            }],
            after: Some("k".into()),
            last: true,
            dedup_evicted_max: 5,
            ..Default::default()
        })),
    };
    let command = ShardKv::decode_command(&install.encode_to_vec()).expect("decodes");
    assert_eq!(g2.apply(command), ok());
    assert_eq!(g2.serving(), vec![0]);
    assert_eq!(g2.shards[&0].contents.dedup.len(), 1);
    assert_eq!(g2.shards[&0].contents.dedup.evicted_max(), 5);
    // The new encoding of a cursor among the records round-trips through a snapshot.
    let mut pulling = ShardKv::new(2);
    pulling.restore(&snapshot).expect("decodes");
    if let Some(owned) = pulling.shards.get_mut(&0) {
        owned.cursor = Cursor::Sessions(Some(9));
    }
    let mut restored = ShardKv::new(2);
    restored.restore(&pulling.snapshot()).expect("decodes");
    assert_eq!(restored.duties(), pulling.duties());
}

/// `g1`'s snapshot as a version before `Frozen` wrote it: its frozen copies in `outgoing`, with no
/// owner and no served flag.
fn as_legacy_snapshot(g1: &ShardKv) -> Vec<u8> {
    use crate::proto::shardkv as pb;
    use prost::Message as _;
    let mut state = pb::State::decode(g1.snapshot().as_ref()).expect("decodes");
    state.outgoing = std::mem::take(&mut state.frozen)
        .into_iter()
        .map(|f| f.contents.unwrap_or_default())
        .collect();
    state.encode_to_vec()
}

#[test]
fn a_copy_frozen_by_a_version_that_kept_no_owner_can_still_be_taken_and_dropped() {
    let mut g1 = ShardKv::new(1);
    g1.apply(ShardCommand::NextConfig(config(1, &[1])));
    assert_eq!(g1.apply(put(5, 1, &key_in(0, 1), "v")), ok());
    g1.apply(ShardCommand::NextConfig(config(2, &[2])));

    // Restored at the configuration that gave the copy away: the owner is that configuration's.
    let mut restored = ShardKv::new(1);
    restored
        .restore(&as_legacy_snapshot(&g1))
        .expect("an old snapshot decodes");
    assert_eq!(pull(&mut restored, None, Some(3)), ShardOutput::NotOwner(2));
    assert!(matches!(
        pull(&mut restored, None, Some(2)),
        ShardOutput::Pulled(_)
    ));
    assert_eq!(drop_copy(&mut restored, Some(2)), ShardOutput::Dropped);

    // Restored after the group moved on (the shard has gone on to group 3 since): who took the copy
    // in configuration 2 is not known here, so any group may take it, as that version allowed - and a
    // later configuration does not hand it to its own owner of the shard.
    g1.apply(ShardCommand::NextConfig(config(3, &[3])));
    let mut restored = ShardKv::new(1);
    restored
        .restore(&as_legacy_snapshot(&g1))
        .expect("an old snapshot decodes");
    restored.apply(ShardCommand::NextConfig(config(4, &[4])));
    assert!(matches!(
        pull(&mut restored, None, Some(2)),
        ShardOutput::Pulled(_)
    ));
    assert_eq!(drop_copy(&mut restored, Some(2)), ShardOutput::Dropped);
    assert!(restored.outgoing().is_empty());
}

/// A configuration of another shard count (a controller started with another `--shards`) would
/// move every stored key to another shard: the group does not propose it, and keeps serving what it
/// stores.
#[test]
fn a_configuration_of_another_shard_count_is_refused() {
    let mut g1 = ShardKv::new(1);
    assert_eq!(g1.apply(ShardCommand::NextConfig(config(1, &[1, 1]))), ok());
    let k1 = key_in(1, 2);
    assert_eq!(g1.apply(put(7, 1, &k1, "v")), ok());
    let three = config(2, &[1, 1, 1]);
    assert!(g1.changes_shard_count(&three));
    let answer = migration::Answer::Config(three);
    let duty = Duty::FetchConfig { num: 2 };
    let refused = migration::command(&g1, &duty, answer).expect_err("another count");
    assert!(
        refused.to_string().contains("another --shards"),
        "{refused}"
    );
    assert_eq!(g1.config().num, 1);
    assert!(matches!(get(&g1, &k1), ShardOutput::Kv(KvOutput { value: Some(v), .. }) if v == "v"));
    // Configuration 0 holds no data: the first configuration may set any count.
    assert!(!ShardKv::new(2).changes_shard_count(&config(1, &[2, 2, 2])));
}

/// What the transfer service answers without a log entry is what the machine would answer: a
/// configuration not reached, a copy deleted or never held, a caller the copy was not given to.
/// Only the new owner's pull and delete of a held copy go to the log.
#[test]
fn transfers_the_state_already_decides_are_answered_as_the_machine_would() {
    let mut g1 = ShardKv::new(1);
    g1.apply(ShardCommand::NextConfig(config(1, &[1])));
    g1.apply(ShardCommand::NextConfig(config(2, &[2])));
    let settled = |g: &ShardKv, num: u64, by: Gid| g.transfer_settled(num, 0, Some(by));
    assert_eq!(
        settled(&g1, 2, 2),
        None,
        "the new owner's pull serves a page"
    );
    assert_eq!(settled(&g1, 2, 3), Some(Settled::NotOwner(2)));
    assert_eq!(pull(&mut g1, None, Some(3)), ShardOutput::NotOwner(2));
    // A configuration not reached is for the log to answer: this replica may lag or not lead.
    for num in [3, u64::MAX] {
        assert_eq!(settled(&g1, num, 2), None);
    }
    assert_eq!(
        settled(&g1, 1, 2),
        Some(Settled::Absent),
        "never given away"
    );
    let ShardOutput::Pulled(last) = pull(&mut g1, None, Some(2)) else {
        panic!("the new owner was refused")
    };
    assert!(last.last);
    assert_eq!(drop_copy(&mut g1, Some(2)), ShardOutput::Dropped);
    // Deleted: settled for good, for anyone, and the machine agrees.
    for by in [2, 3] {
        assert_eq!(settled(&g1, 2, by), Some(Settled::Absent));
    }
    assert_eq!(pull(&mut g1, None, Some(2)), ShardOutput::NotReady);
    assert_eq!(drop_copy(&mut g1, Some(3)), ShardOutput::Dropped);
}

/// A shard group's quota (the log's policy, as a KV cluster's) bounds all its shards together: a
/// write to a nearly empty shard is refused when the group as a whole is full.
#[test]
fn a_shard_groups_quota_bounds_its_shards_together() {
    use crate::rsm::sessions::{LogClock, LogPolicy};
    let mut g1 = ShardKv::new(1);
    assert_eq!(g1.apply(ShardCommand::NextConfig(config(1, &[1, 1]))), ok());
    g1.observe_clock(&LogClock {
        now_ms: 1,
        policy: Some(LogPolicy {
            quota_bytes: 30 + 2 * crate::kv::state::KEY_OVERHEAD_BYTES,
            ..LogPolicy::KEEP_ALL
        }),
    });
    let (k0, k1) = (key_in(0, 2), key_in(1, 2));
    assert_eq!(g1.apply(put(7, 1, &k0, &"x".repeat(20 - k0.len()))), ok());
    let refused = g1.apply(put(7, 2, &k1, &"y".repeat(20 - k1.len())));
    assert!(
        matches!(
            refused,
            ShardOutput::Kv(KvOutput {
                over_quota: true,
                ..
            })
        ),
        "{refused:?}"
    );
    assert!(
        matches!(get(&g1, &k1), ShardOutput::Kv(KvOutput { value: None, .. })),
        "written anyway"
    );
    assert_eq!(g1.apply(put(7, 3, &k1, &"y".repeat(10 - k1.len()))), ok());
}
