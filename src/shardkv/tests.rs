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
        matches!(&pull[..], [Duty::Pull { config_num: 2, shard: 1, from, after: None }] if from.gid == 1),
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
            after: None,
            by: Some(2),
        }),
        ShardOutput::NotReady
    );
    let ShardOutput::Pulled(data) = g1.apply(ShardCommand::Pull {
        config_num: 2,
        shard: 1,
        after: None,
        by: Some(2),
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
        })
    );
    // Now group 2 owes group 1 a delete; group 1 drops its copy; group 2 records the confirmation.
    assert!(g2
        .duties()
        .iter()
        .any(|d| matches!(d, Duty::Delete { config_num: 2, shard: 1, to } if to.gid == 1)));
    assert_eq!(g1.outgoing(), vec![(2, 1)]);
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
        after: None,
        by: Some(2),
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
            after: Some("k".into()),
            by: Some(7),
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
        }) else {
            panic!("pull refused")
        };
        let bytes: usize = page.data.iter().map(|(k, v)| k.len() + v.len()).sum();
        assert!(bytes <= 2 * PAGE_BYTES, "page of {bytes} bytes");
        assert_eq!(
            page.dedup.is_empty(),
            !page.last,
            "dedup only on the last page"
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
            })
        );
    }
    // The dedup records arrived with the last page.
    assert_eq!(
        g2.apply(ShardCommand::Client {
            client: 5,
            seq: 10,
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
        after: None,
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
        after: None,
        by: Some(2),
    };
    assert_eq!(g1.apply(early), ShardOutput::NotReady);
    g1.apply(ShardCommand::NextConfig(config(3, &[2, 2])));
    let ShardOutput::Pulled(page) = g1.apply(ShardCommand::Pull {
        config_num: 2,
        shard: 0,
        after: None,
        by: Some(2),
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
    machine.apply(ShardCommand::Pull {
        config_num: 2,
        shard: 0,
        after: after.map(String::from),
        by,
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
    let after = first.data.last().map(|(k, _)| k.clone());
    let ShardOutput::Pulled(last) = pull(&mut g1, after.as_deref(), Some(2)) else {
        panic!("the new owner was refused")
    };
    assert!(last.last);
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
