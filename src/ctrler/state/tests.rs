use super::*;

fn servers(names: &[&str]) -> Vec<String> {
    names.iter().map(|s| s.to_string()).collect()
}

fn apply(ctrler: &mut ShardCtrler, command: CtrlerCommand) -> u64 {
    match ctrler.apply(command) {
        Ok(CtrlerAnswer::Created(num)) => num,
        other => panic!("expected a new configuration, got {other:?}"),
    }
}

/// Configurations 1 to 6: joins, a move, a leave, a move.
fn history() -> ShardCtrler {
    let mut ctrler = ShardCtrler::default();
    apply(
        &mut ctrler,
        CtrlerCommand::Join {
            groups: [(1, servers(&["a", "b"])), (2, servers(&["c"]))].into(),
            shards: 0,
        },
    );
    apply(&mut ctrler, CtrlerCommand::Move { shard: 0, gid: 2 });
    apply(
        &mut ctrler,
        CtrlerCommand::Join {
            groups: [(3, servers(&["d"]))].into(),
            shards: 0,
        },
    );
    apply(&mut ctrler, CtrlerCommand::Leave(vec![2]));
    apply(&mut ctrler, CtrlerCommand::Move { shard: 9, gid: 3 });
    apply(
        &mut ctrler,
        CtrlerCommand::Join {
            groups: [(2, servers(&["c2"]))].into(),
            shards: 0,
        },
    );
    ctrler
}

fn configs(ctrler: &ShardCtrler) -> Vec<Config> {
    (0..).map_while(|num| ctrler.config(num).cloned()).collect()
}

#[test]
fn a_move_shares_the_group_map_and_a_join_shares_server_lists() {
    let ctrler = history();
    let c = configs(&ctrler);
    assert_eq!(c.len(), 7);
    assert!(
        c[2].groups.shares_with(&c[1].groups),
        "a move copied the groups"
    );
    assert!(
        c[5].groups.shares_with(&c[4].groups),
        "a move copied the groups"
    );
    assert!(!c[3].groups.shares_with(&c[2].groups));
    assert!(
        Arc::ptr_eq(&c[1].groups[&1], &c[3].groups[&1]),
        "a join copied servers"
    );
    assert!(
        Arc::ptr_eq(&c[3].groups[&3], &c[6].groups[&3]),
        "a leave copied servers"
    );
    assert_eq!(c[6].groups[&2][..], servers(&["c2"]));
}

#[test]
fn a_restored_snapshot_answers_and_shares_the_same() {
    let ctrler = history();
    let data = ctrler.snapshot();
    let mut copy = ShardCtrler::new(3);
    copy.restore(&data).expect("restore");
    assert_eq!(configs(&copy), configs(&ctrler));
    assert_eq!(copy.snapshot(), data, "re-snapshot differs");
    let c = configs(&copy);
    assert!(c[2].groups.shares_with(&c[1].groups));
    assert!(Arc::ptr_eq(&c[1].groups[&1], &c[3].groups[&1]));
    // Each group's servers are written once per join, not once per configuration.
    let state = pb::State::decode(data.as_ref()).expect("decode");
    assert!(state.configs.is_empty());
    let joined: Vec<Gid> = state
        .history
        .iter()
        .flat_map(|c| c.joined.iter().map(|g| g.gid))
        .collect();
    assert_eq!(joined, vec![1, 2, 3, 2]);
}

#[test]
fn a_snapshot_of_the_older_format_still_restores() {
    let ctrler = history();
    let old = pb::State {
        shards: DEFAULT_SHARDS as u64,
        configs: configs(&ctrler).iter().map(config_to_proto).collect(),
        ..pb::State::default()
    };
    let mut copy = ShardCtrler::default();
    copy.restore(&old.encode_to_vec()).expect("restore");
    assert_eq!(configs(&copy), configs(&ctrler));
    // Written in the new format, byte for byte what a replica that never saw the old one writes.
    assert_eq!(copy.snapshot(), ctrler.snapshot());
    let c = configs(&copy);
    assert!(
        c[2].groups.shares_with(&c[1].groups),
        "equal maps are shared"
    );
    assert!(
        Arc::ptr_eq(&c[1].groups[&1], &c[3].groups[&1]),
        "equal servers are shared"
    );
}

#[test]
fn broken_snapshots_are_refused() {
    let empty = pb::State::default().encode_to_vec();
    assert!(ShardCtrler::default().restore(&empty).is_err());
    let stranger = pb::State {
        shards: 1,
        configs: Vec::new(),
        history: vec![pb::Change {
            shards: vec![0],
            left: vec![7],
            joined: Vec::new(),
        }],
        ..pb::State::default()
    };
    let mut ctrler = ShardCtrler::default();
    let err = ctrler
        .restore(&stranger.encode_to_vec())
        .expect_err("a non-member cannot leave");
    assert!(err.to_string().contains("group 7"), "{err}");
    assert_eq!(ctrler.latest().num, 0, "a refused snapshot changes nothing");
}

#[test]
fn outputs_are_small_and_older_ones_still_decode() {
    let created = ShardCtrler::encode_output(&Ok(CtrlerAnswer::Created(1234)));
    assert!(created.len() <= 4, "{} bytes", created.len());
    assert_eq!(
        ShardCtrler::decode_output(&created),
        Ok(Ok(CtrlerAnswer::Created(1234)))
    );
    let refused = ShardCtrler::encode_output(&Err("no".into()));
    assert_eq!(ShardCtrler::decode_output(&refused), Ok(Err("no".into())));
    // A session table written before `created`: a command's whole configuration.
    let config = history().latest().clone();
    let old = pb::Outcome {
        error: String::new(),
        config: Some(config_to_proto(&config)),
        ..pb::Outcome::default()
    };
    assert_eq!(
        ShardCtrler::decode_output(&old.encode_to_vec()),
        Ok(Ok(CtrlerAnswer::Config(config)))
    );
}

#[test]
fn the_limits_checked_before_proposing_are_those_of_the_log() {
    let too_many: BTreeMap<Gid, Vec<String>> =
        [(5, vec!["x".to_string(); MAX_SERVERS_PER_GROUP + 1])].into();
    let mut ctrler = ShardCtrler::default();
    assert_eq!(
        check_join(&too_many),
        ctrler
            .apply(CtrlerCommand::Join {
                groups: too_many.clone(),
                shards: 0
            })
            .map(|_| ())
    );
    assert!(check_join(&BTreeMap::new()).is_err());
    assert!(check_join(&[(0, servers(&["a"]))].into()).is_err());
    // The largest id is a shard group's mark for a copy any group may take: no group can have it.
    assert_eq!(
        check_join(&[(Gid::MAX, servers(&["a"]))].into()),
        Err(format!("gid {} is reserved", Gid::MAX))
    );
    assert!(check_join(&[(1, servers(&["a"; MAX_SERVERS_PER_GROUP]))].into()).is_ok());
    // The old refusals keep their words.
    apply(
        &mut ctrler,
        CtrlerCommand::Join {
            groups: [(1, servers(&["a"]))].into(),
            shards: 0,
        },
    );
    assert_eq!(
        ctrler.apply(CtrlerCommand::Join {
            groups: [(1, servers(&["a"]))].into(),
            shards: 0
        }),
        Err("group 1 has already joined".into())
    );
}

fn report(ctrler: &mut ShardCtrler, gid: Gid, num: u64, keep: u64) -> u64 {
    match ctrler.apply(CtrlerCommand::Progress { gid, num, keep }) {
        Ok(CtrlerAnswer::Recorded { oldest }) => {
            assert_eq!(oldest, ctrler.oldest());
            oldest
        }
        other => panic!("expected the report recorded, got {other:?}"),
    }
}

fn join(ctrler: &mut ShardCtrler, gid: Gid) -> u64 {
    apply(
        ctrler,
        CtrlerCommand::Join {
            groups: [(gid, servers(&["s"]))].into(),
            shards: 0,
        },
    )
}

fn moves(ctrler: &mut ShardCtrler, count: usize, gid: Gid) -> u64 {
    let mut num = 0;
    for i in 0..count {
        num = apply(
            ctrler,
            CtrlerCommand::Move {
                shard: (i % DEFAULT_SHARDS) as u64,
                gid,
            },
        );
    }
    num
}

#[test]
fn configurations_no_group_needs_are_dropped_and_a_query_for_one_says_so() {
    let mut ctrler = ShardCtrler::default();
    join(&mut ctrler, 1);
    join(&mut ctrler, 2); // 2
    let latest = moves(&mut ctrler, 20, 1); // 3..=22
    assert_eq!(latest, 22);
    // Nothing is dropped while a group may still ask for it.
    assert_eq!(report(&mut ctrler, 1, 22, 5), 1, "group 2 never reported");
    assert_eq!(report(&mut ctrler, 2, 10, 5), 10);
    assert_eq!(ctrler.kept(), 13);
    assert_eq!(
        ctrler.query(&CtrlerQuery(Some(9))),
        Ok(CtrlerAnswer::Compacted { oldest: 10 })
    );
    assert!(matches!(
        ctrler.query(&CtrlerQuery(Some(10))),
        Ok(CtrlerAnswer::Config(c)) if c.num == 10
    ));
    // Once every group has passed them, only the `keep` newest remain.
    assert_eq!(report(&mut ctrler, 2, 22, 5), 17);
    assert_eq!(ctrler.kept(), 6);
    // A report from the future is refused and drops nothing.
    assert!(ctrler
        .apply(CtrlerCommand::Progress {
            gid: 1,
            num: 23,
            keep: 0
        })
        .is_err());
    assert_eq!(ctrler.oldest(), 17);
    // Reports never move a group back.
    assert_eq!(report(&mut ctrler, 2, 3, 0), 22);
    assert_eq!(ctrler.latest().num, 22);
}

#[test]
fn a_group_that_joins_needs_only_the_configuration_before_it() {
    let mut ctrler = ShardCtrler::default();
    join(&mut ctrler, 1);
    moves(&mut ctrler, 10, 1); // 2..=11
    let joined = join(&mut ctrler, 2); // 12
    assert_eq!(report(&mut ctrler, 1, joined, 0), joined - 1);
    assert!(!ctrler.config(joined - 1).expect("kept").shards.contains(&2));
    assert_eq!(
        report(&mut ctrler, 2, 0, 0),
        joined - 1,
        "it may jump there"
    );
    assert_eq!(report(&mut ctrler, 2, joined, 0), joined);
}

#[test]
fn a_group_that_left_is_waited_for_until_it_passes_its_leave() {
    let mut ctrler = ShardCtrler::default();
    join(&mut ctrler, 1);
    join(&mut ctrler, 2); // 2
    report(&mut ctrler, 2, 2, 0);
    let left = apply(&mut ctrler, CtrlerCommand::Leave(vec![2])); // 3
    let latest = moves(&mut ctrler, 5, 1); // 4..=8
                                           // Group 2 still has shards to hand over in `left`.
    assert_eq!(report(&mut ctrler, 1, latest, 0), 2);
    // Once past it, it is forgotten: it owns nothing in any later configuration.
    assert_eq!(report(&mut ctrler, 2, left, 0), latest);
    assert_eq!(ctrler.kept(), 1);
    // Rejoining, it needs what any new group needs.
    let rejoined = join(&mut ctrler, 2);
    assert_eq!(report(&mut ctrler, 1, rejoined, 0), rejoined - 1);
}

#[test]
fn a_group_that_rejoins_before_handing_over_keeps_what_it_needed() {
    let mut ctrler = ShardCtrler::default();
    join(&mut ctrler, 1);
    join(&mut ctrler, 2); // 2
    report(&mut ctrler, 2, 2, 0);
    apply(&mut ctrler, CtrlerCommand::Leave(vec![2])); // 3
    let rejoined = join(&mut ctrler, 2); // 4
    moves(&mut ctrler, 3, 1);
    let latest = ctrler.latest().num;
    assert_eq!(
        report(&mut ctrler, 1, latest, 0),
        2,
        "group 2 is still at 2"
    );
    assert!(rejoined > 2);
}

#[test]
fn a_shard_nobody_owns_keeps_the_history_back_to_its_last_owner() {
    let mut ctrler = ShardCtrler::default();
    join(&mut ctrler, 1); // 1: group 1 owns every shard
    apply(&mut ctrler, CtrlerCommand::Leave(vec![1])); // 2: nobody does
    let adopted = join(&mut ctrler, 2); // 3: group 2 adopts them
    report(&mut ctrler, 1, 2, 0); // group 1 is done and forgotten
                                  // Group 2 finds the frozen copies by walking back from 3 to 1, the last configuration with an owner.
    assert_eq!(report(&mut ctrler, 2, adopted, 0), 1);
    let latest = moves(&mut ctrler, 2, 2);
    assert_eq!(report(&mut ctrler, 2, latest, 0), latest);
}

#[test]
fn a_compacted_history_survives_a_snapshot_byte_for_byte() {
    let mut ctrler = ShardCtrler::default();
    join(&mut ctrler, 1);
    join(&mut ctrler, 2);
    moves(&mut ctrler, 12, 2);
    apply(&mut ctrler, CtrlerCommand::Leave(vec![1]));
    report(&mut ctrler, 2, 8, 3);
    assert_eq!(ctrler.oldest(), 0, "group 1 has not passed its leave");
    report(&mut ctrler, 1, 6, 3);
    report(&mut ctrler, 2, 10, 3);
    assert_eq!(ctrler.oldest(), 6);
    let data = ctrler.snapshot();
    let mut copy = ShardCtrler::default();
    copy.restore(&data).expect("restore");
    assert_eq!(copy.snapshot(), data);
    assert_eq!(copy.oldest(), 6);
    for num in 6..=ctrler.latest().num {
        assert_eq!(copy.config(num), ctrler.config(num), "configuration {num}");
    }
    // Both go on dropping the same configurations.
    assert_eq!(report(&mut copy, 1, 15, 3), report(&mut ctrler, 1, 15, 3));
    assert_eq!(copy.snapshot(), ctrler.snapshot());
}

#[test]
fn a_snapshot_without_progress_drops_nothing_a_group_may_need() {
    let mut ctrler = history();
    let mut state = pb::State::decode(ctrler.snapshot().as_ref()).expect("decode");
    state.members.clear();
    let mut copy = ShardCtrler::default();
    copy.restore(&state.encode_to_vec()).expect("restore");
    // Group 1 joined in 1 and never reported: everything from 0 stays.
    let latest = ctrler.latest().num;
    assert_eq!(report(&mut copy, 3, latest, 0), 0);
    assert_eq!(report(&mut ctrler, 3, latest, 0), 0);
    assert_eq!(copy.snapshot(), ctrler.snapshot());
}

#[test]
fn progress_outputs_are_small_and_decode() {
    for answer in [
        CtrlerAnswer::Recorded { oldest: 77 },
        CtrlerAnswer::Compacted { oldest: 77 },
    ] {
        let data = ShardCtrler::encode_output(&Ok(answer.clone()));
        assert!(data.len() <= 4, "{} bytes", data.len());
        assert_eq!(ShardCtrler::decode_output(&data), Ok(Ok(answer)));
    }
}

#[test]
fn a_new_server_list_keeps_the_shards_and_survives_a_snapshot() {
    let mut ctrler = history();
    let before = ctrler.latest().clone();
    let num = apply(
        &mut ctrler,
        CtrlerCommand::Servers {
            gid: 1,
            servers: servers(&["b", "e"]),
            expected: Some(servers(&["a", "b"])),
        },
    );
    let after = ctrler.latest().clone();
    assert_eq!(num, before.num + 1);
    assert_eq!(after.shards, before.shards, "a server change moved shards");
    assert_eq!(&*after.groups[&1], &servers(&["b", "e"])[..]);
    assert!(
        Arc::ptr_eq(&after.groups[&3], &before.groups[&3]),
        "the other groups' lists were copied"
    );
    // The same list again is no new configuration.
    let again = CtrlerCommand::Servers {
        gid: 1,
        servers: servers(&["b", "e"]),
        expected: None,
    };
    assert_eq!(apply(&mut ctrler, again), num);
    // The log's encoding and a snapshot keep it.
    let command = CtrlerCommand::Servers {
        gid: 3,
        servers: servers(&["f"]),
        expected: Some(servers(&["d"])),
    };
    let decoded =
        ShardCtrler::decode_command(&ShardCtrler::encode_command(&command)).expect("decodes");
    assert_eq!(decoded, command);
    let mut restored = ShardCtrler::default();
    restored.restore(&ctrler.snapshot()).expect("restores");
    assert_eq!(configs(&restored), configs(&ctrler));
}

#[test]
fn a_server_list_for_an_unknown_group_or_of_no_servers_is_refused() {
    let mut ctrler = history();
    let latest = ctrler.latest().num;
    for (gid, list, words) in [
        (9, servers(&["x"]), "not a member"),
        (1, Vec::new(), "no servers"),
        (0, servers(&["x"]), "reserved"),
    ] {
        let error = ctrler
            .apply(CtrlerCommand::Servers {
                gid,
                servers: list,
                expected: None,
            })
            .expect_err("refused");
        assert!(error.contains(words), "{error}");
    }
    assert_eq!(
        ctrler.latest().num,
        latest,
        "a refusal made a configuration"
    );
}

/// `--shards` is each controller's own flag: a replica started with another count that replays the
/// log builds the same configurations as its peers (the first join's stamp fixes the count), and a
/// join proposed by a controller of another count later is refused, with the count to use.
#[test]
fn the_first_join_fixes_the_shard_count_for_every_replica() {
    let stamped = |gid: Gid, shards: u64| CtrlerCommand::Join {
        groups: [(gid, servers(&["s"]))].into(),
        shards,
    };
    let (mut ours, mut other_flag) = (ShardCtrler::new(10), ShardCtrler::new(16));
    for command in [stamped(1, 10), stamped(2, 0), stamped(3, 10)] {
        assert_eq!(ours.apply(command.clone()), other_flag.apply(command));
    }
    assert_eq!(configs(&ours), configs(&other_flag));
    assert_eq!(ours.latest().shards.len(), 10);
    let refused = ours.apply(stamped(4, 16)).expect_err("another count");
    assert!(refused.contains("restart it with --shards 10"), "{refused}");
    assert_eq!(ours.latest().num, 3, "a refused join made a configuration");
    // Before any join, the stamp decides, within the limit.
    let mut fresh = ShardCtrler::new(10);
    let too_many = stamped(1, MAX_SHARDS as u64 + 1);
    assert!(fresh.apply(too_many).is_err());
    apply(&mut fresh, stamped(1, 12));
    assert_eq!(fresh.latest().shards.len(), 12);
    assert_eq!(fresh.config(0).map(|c| c.shards.len()), Some(12));
}
