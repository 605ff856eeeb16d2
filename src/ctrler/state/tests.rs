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
        CtrlerCommand::Join([(1, servers(&["a", "b"])), (2, servers(&["c"]))].into()),
    );
    apply(&mut ctrler, CtrlerCommand::Move { shard: 0, gid: 2 });
    apply(
        &mut ctrler,
        CtrlerCommand::Join([(3, servers(&["d"]))].into()),
    );
    apply(&mut ctrler, CtrlerCommand::Leave(vec![2]));
    apply(&mut ctrler, CtrlerCommand::Move { shard: 9, gid: 3 });
    apply(
        &mut ctrler,
        CtrlerCommand::Join([(2, servers(&["c2"]))].into()),
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
        history: Vec::new(),
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
        created: None,
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
            .apply(CtrlerCommand::Join(too_many.clone()))
            .map(|_| ())
    );
    assert!(check_join(&BTreeMap::new()).is_err());
    assert!(check_join(&[(0, servers(&["a"]))].into()).is_err());
    assert!(check_join(&[(1, servers(&["a"; MAX_SERVERS_PER_GROUP]))].into()).is_ok());
    // The old refusals keep their words.
    apply(
        &mut ctrler,
        CtrlerCommand::Join([(1, servers(&["a"]))].into()),
    );
    assert_eq!(
        ctrler.apply(CtrlerCommand::Join([(1, servers(&["a"]))].into())),
        Err("group 1 has already joined".into())
    );
}
