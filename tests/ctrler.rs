//! The shard controller scenarios of 6.824 (lab 4A) on the deterministic simulator: three controller
//! servers (Raft + rsm + `ShardCtrler`), clerks over the simulated network. Unlike the Go originals, the
//! minimal-transfer checks here are real: after a join no shard may move between old groups, after a
//! leave no shard may move between remaining groups.

use bytes::Bytes;
use ds824::ctrler::state::{
    check_join, MAX_ADDRESS_BYTES, MAX_CONFIG_SERVER_BYTES, MAX_GROUPS, MAX_SERVERS_PER_GROUP,
};
use ds824::ctrler::{
    Config, CtrlerAnswer, CtrlerCommand, CtrlerOutput, CtrlerQuery, Gid, ShardCtrler,
};
use ds824::raft::{Entry, EntryKind, Snapshot, SnapshotMeta};
use ds824::rsm::{Completion, Prepared, Rsm, StateMachine as _};
use ds824::sim::seed;
use ds824::sim::service::{
    run_clients, Clerk, ClerkOp, ScriptClient, ServiceCluster, ServiceOptions,
};

type Cluster = ServiceCluster<ShardCtrler>;
type Ck = Clerk<ShardCtrler>;

fn cluster(name: &str) -> Cluster {
    Cluster::new(ServiceOptions {
        servers: 3,
        reliable: true,
        max_raft_state: None,
        seed: seed::for_test(name),
        follower_reads: false,
    })
}

fn servers(names: &[&str]) -> Vec<String> {
    names.iter().map(|s| s.to_string()).collect()
}

fn join_op(groups: &[(Gid, Vec<String>)]) -> ClerkOp<ShardCtrler> {
    ClerkOp::Command(CtrlerCommand::Join {
        groups: groups.iter().cloned().collect(),
        shards: 0,
    })
}

fn leave_op(gids: &[Gid]) -> ClerkOp<ShardCtrler> {
    ClerkOp::Command(CtrlerCommand::Leave(gids.to_vec()))
}

fn run(cfg: &mut Cluster, ck: &mut Ck, op: ClerkOp<ShardCtrler>) -> CtrlerAnswer {
    cfg.run_op(ck, op)
        .unwrap_or_else(|e| panic!("controller refused: {e}"))
}

fn query(cfg: &mut Cluster, ck: &mut Ck, num: Option<u64>) -> Config {
    match run(cfg, ck, ClerkOp::Query(CtrlerQuery(num))) {
        CtrlerAnswer::Config(config) => config,
        other => panic!("a query answered {other:?}"),
    }
}

/// 6.824's `check`: exactly the expected groups, every shard assigned to one of them, balanced.
fn check(cfg: &mut Cluster, ck: &mut Ck, gids: &[Gid]) -> Config {
    let c = query(cfg, ck, None);
    let mut got: Vec<Gid> = c.groups.keys().copied().collect();
    let mut want = gids.to_vec();
    got.sort_unstable();
    want.sort_unstable();
    assert_eq!(got, want, "wrong groups in config {}", c.num);
    if !gids.is_empty() {
        for (shard, gid) in c.shards.iter().enumerate() {
            assert!(
                c.groups.contains_key(gid),
                "shard {shard} -> invalid group {gid}"
            );
        }
    }
    let counts: Vec<usize> = gids
        .iter()
        .map(|g| c.shards.iter().filter(|s| *s == g).count())
        .collect();
    if let (Some(max), Some(min)) = (counts.iter().max(), counts.iter().min()) {
        assert!(max - min <= 1, "max {max} too much larger than min {min}");
    }
    c
}

/// After joins: a shard held by a group that existed before must still be held by that group.
fn check_join_moves(before: &Config, after: &Config) {
    for (shard, (&old, &new)) in before.shards.iter().zip(&after.shards).enumerate() {
        if after.groups.contains_key(&old) && before.groups.contains_key(&new) {
            assert_eq!(
                old, new,
                "join moved shard {shard} from group {old} to old group {new}"
            );
        }
    }
}

/// After leaves: a shard whose group remains must not move.
fn check_leave_moves(before: &Config, after: &Config) {
    for (shard, (&old, &new)) in before.shards.iter().zip(&after.shards).enumerate() {
        if after.groups.contains_key(&old) {
            assert_eq!(
                old, new,
                "leave moved shard {shard} away from remaining group {old}"
            );
        }
    }
}

#[test]
fn basic() {
    let mut cfg = cluster("ctrler_basic");
    let mut ck = cfg.make_clerk();

    // Basic leave/join.
    let mut cfa = vec![check(&mut cfg, &mut ck, &[])];
    run(
        &mut cfg,
        &mut ck,
        join_op(&[(1, servers(&["x", "y", "z"]))]),
    );
    cfa.push(check(&mut cfg, &mut ck, &[1]));
    run(
        &mut cfg,
        &mut ck,
        join_op(&[(2, servers(&["a", "b", "c"]))]),
    );
    let cfx = check(&mut cfg, &mut ck, &[1, 2]);
    assert_eq!(
        cfx.groups[&1][..],
        servers(&["x", "y", "z"]),
        "wrong servers for gid 1"
    );
    assert_eq!(
        cfx.groups[&2][..],
        servers(&["a", "b", "c"]),
        "wrong servers for gid 2"
    );
    cfa.push(cfx);
    run(&mut cfg, &mut ck, leave_op(&[1]));
    cfa.push(check(&mut cfg, &mut ck, &[2]));
    run(&mut cfg, &mut ck, leave_op(&[2]));
    cfa.push(check(&mut cfg, &mut ck, &[]));

    // Historical queries, with each server down in turn.
    for s in 0..3 {
        cfg.shutdown_server(s);
        for old in &cfa {
            assert_eq!(
                &query(&mut cfg, &mut ck, Some(old.num)),
                old,
                "historical config differs"
            );
        }
        cfg.start_server(s);
    }

    // Move.
    let (gid3, gid4) = (503, 504);
    run(
        &mut cfg,
        &mut ck,
        join_op(&[(gid3, servers(&["3a", "3b", "3c"]))]),
    );
    run(
        &mut cfg,
        &mut ck,
        join_op(&[(gid4, servers(&["4a", "4b", "4c"]))]),
    );
    for shard in 0..10u64 {
        let before = query(&mut cfg, &mut ck, None);
        let gid = if shard < 5 { gid3 } else { gid4 };
        run(
            &mut cfg,
            &mut ck,
            ClerkOp::Command(CtrlerCommand::Move { shard, gid }),
        );
        let after = query(&mut cfg, &mut ck, None);
        assert!(after.num > before.num, "Move should increase Config.Num");
    }
    let c = query(&mut cfg, &mut ck, None);
    for (shard, gid) in c.shards.iter().enumerate() {
        let want = if shard < 5 { gid3 } else { gid4 };
        assert_eq!(*gid, want, "shard {shard} wrong group after Move");
    }
    // A bad Move is refused with a reason, and changes nothing.
    let refused = cfg.run_op(
        &mut ck,
        ClerkOp::Command(CtrlerCommand::Move {
            shard: 99,
            gid: gid3,
        }),
    );
    assert!(
        refused.is_err(),
        "moving a shard that does not exist must be refused"
    );
    run(&mut cfg, &mut ck, leave_op(&[gid3]));
    run(&mut cfg, &mut ck, leave_op(&[gid4]));

    // Concurrent leave/join.
    let npara = 10u64;
    let gids: Vec<Gid> = (0..npara).map(|i| 100 + 10 * i).collect();
    let mut clients: Vec<ScriptClient<ShardCtrler>> = gids
        .iter()
        .map(|&gid| {
            let script = vec![
                join_op(&[(gid + 1000, servers(&["a"]))]),
                join_op(&[(gid, servers(&["a"]))]),
                leave_op(&[gid + 1000]),
            ];
            ScriptClient::new(cfg.make_clerk(), script)
        })
        .collect();
    run_clients(&mut cfg, &mut clients);
    check(&mut cfg, &mut ck, &gids);

    // Minimal transfers after joins.
    let c1 = query(&mut cfg, &mut ck, None);
    for i in 0..5 {
        run(
            &mut cfg,
            &mut ck,
            join_op(&[(npara + 1 + i, servers(&["a"]))]),
        );
    }
    let c2 = query(&mut cfg, &mut ck, None);
    check_join_moves(&c1, &c2);

    // Minimal transfers after leaves.
    for i in 0..5 {
        run(&mut cfg, &mut ck, leave_op(&[npara + 1 + i]));
    }
    let c3 = query(&mut cfg, &mut ck, None);
    check_leave_moves(&c2, &c3);
    check(&mut cfg, &mut ck, &gids);
    cfg.end("ctrler_basic");
}

#[test]
fn multi() {
    let mut cfg = cluster("ctrler_multi");
    let mut ck = cfg.make_clerk();

    // Multi-group join/leave.
    check(&mut cfg, &mut ck, &[]);
    run(
        &mut cfg,
        &mut ck,
        join_op(&[
            (1, servers(&["x", "y", "z"])),
            (2, servers(&["a", "b", "c"])),
        ]),
    );
    check(&mut cfg, &mut ck, &[1, 2]);
    run(
        &mut cfg,
        &mut ck,
        join_op(&[(3, servers(&["j", "k", "l"]))]),
    );
    let cfx = check(&mut cfg, &mut ck, &[1, 2, 3]);
    assert_eq!(cfx.groups[&1][..], servers(&["x", "y", "z"]));
    assert_eq!(cfx.groups[&2][..], servers(&["a", "b", "c"]));
    assert_eq!(cfx.groups[&3][..], servers(&["j", "k", "l"]));
    run(&mut cfg, &mut ck, leave_op(&[1, 3]));
    check(&mut cfg, &mut ck, &[2]);
    run(&mut cfg, &mut ck, leave_op(&[2]));
    check(&mut cfg, &mut ck, &[]);

    // Concurrent multi leave/join.
    let npara = 10u64;
    let gids: Vec<Gid> = (0..npara).map(|i| 1000 + i).collect();
    let mut clients: Vec<ScriptClient<ShardCtrler>> = gids
        .iter()
        .map(|&gid| {
            let script = vec![
                join_op(&[
                    (gid, servers(&["a"])),
                    (gid + 1000, servers(&["a"])),
                    (gid + 2000, servers(&["a"])),
                ]),
                leave_op(&[gid + 1000, gid + 2000]),
            ];
            ScriptClient::new(cfg.make_clerk(), script)
        })
        .collect();
    run_clients(&mut cfg, &mut clients);
    check(&mut cfg, &mut ck, &gids);

    // Minimal transfers after multijoins.
    let c1 = query(&mut cfg, &mut ck, None);
    let new_groups: Vec<(Gid, Vec<String>)> =
        (0..5).map(|i| (npara + 1 + i, servers(&["a"]))).collect();
    run(&mut cfg, &mut ck, join_op(&new_groups));
    let c2 = query(&mut cfg, &mut ck, None);
    check_join_moves(&c1, &c2);

    // Minimal transfers after multileaves.
    let leaving: Vec<Gid> = new_groups.iter().map(|(g, _)| *g).collect();
    run(&mut cfg, &mut ck, leave_op(&leaving));
    let c3 = query(&mut cfg, &mut ck, None);
    check_leave_moves(&c2, &c3);

    // Check same config on servers: the survivors of the leader's crash answer with its config.
    let leader = loop {
        if let Some(l) = cfg.leader() {
            break l;
        }
        cfg.sleep(10);
    };
    let c = query(&mut cfg, &mut ck, None);
    cfg.shutdown_server(leader);
    let c1 = query(&mut cfg, &mut ck, None);
    assert_eq!(
        c, c1,
        "the survivors disagree with the crashed leader's config"
    );
    cfg.end("ctrler_multi");
}

// ------------------------------------------------------------------------------------------------
// Bounded state (#12 item 4): the controller wrapped in `Rsm`, driven directly (no network), so the
// sizes measured are those of the snapshot a replica hands to Raft.
// ------------------------------------------------------------------------------------------------

/// One controller replica's `Rsm` and the log it applied, for replays.
struct Replica {
    rsm: Rsm<ShardCtrler>,
    log: Vec<Entry>,
}

impl Replica {
    fn new() -> Self {
        Replica {
            rsm: Rsm::new(ShardCtrler::default()),
            log: Vec::new(),
        }
    }

    /// Propose `command` as (`client`, `seq`), commit it at the next index and return its output.
    fn command(&mut self, client: u64, seq: u64, command: CtrlerCommand) -> CtrlerOutput {
        let data = match self.rsm.prepare(client, seq, 0, &command, 0) {
            Prepared::Propose(data) => data,
            other => panic!("client {client} seq {seq}: expected a proposal, got {other:?}"),
        };
        let index = self.rsm.applied() + 1;
        self.rsm.expect(client, seq, 0);
        let entry = Entry {
            term: 1,
            index,
            kind: EntryKind::Normal,
            data,
        };
        self.rsm
            .apply_entries(std::slice::from_ref(&entry))
            .expect("apply");
        self.log.push(entry);
        match self.rsm.track(index, index, (client, seq, 0)) {
            Some(Completion::Done { output, .. }) => output,
            other => panic!("client {client} seq {seq}: not done: {other:?}"),
        }
    }

    /// A new replica restored from this one's snapshot.
    fn restored(&self) -> (Replica, Bytes) {
        let (index, data) = self.rsm.snapshot();
        let mut copy = Replica::new();
        copy.rsm
            .apply_snapshot(&Snapshot {
                meta: SnapshotMeta { index, term: 1 },
                data: data.clone(),
                membership: None,
            })
            .expect("restore");
        (copy, data)
    }
}

/// A `len`-byte server address for group `gid`.
fn long_address(gid: Gid, len: usize) -> String {
    let mut address = format!("group-{gid}.example:");
    while address.len() < len {
        address.push('x');
    }
    address
}

/// `groups` clients each join one group with a 1 KiB address, then `moves` clients each move a
/// shard; returns the snapshot size after checking that a restored copy answers the same.
fn big_history(groups: u64, moves: u64) -> usize {
    let mut replica = Replica::new();
    for client in 1..=groups {
        let join = CtrlerCommand::Join {
            groups: [(client, vec![long_address(client, 1024)])].into(),
            shards: 0,
        };
        replica
            .command(client, 1, join)
            .unwrap_or_else(|e| panic!("join {client} refused: {e}"));
    }
    for i in 0..moves {
        let client = 1 + i % groups;
        let seq = 2 + i / groups;
        let gid = 1 + (i * 7919) % groups;
        let shard = i % 10;
        replica
            .command(client, seq, CtrlerCommand::Move { shard, gid })
            .unwrap_or_else(|e| panic!("move {i} refused: {e}"));
    }
    assert_eq!(replica.rsm.sessions() as u64, groups);
    let last = groups + moves;
    let (copy, data) = replica.restored();
    println!(
        "controller snapshot after {groups} joins (1 KiB addresses) and {moves} moves by {groups} clients: {} bytes ({:.2} MiB)",
        data.len(),
        data.len() as f64 / (1 << 20) as f64
    );
    for num in [
        Some(0),
        Some(1),
        Some(groups / 2),
        Some(groups),
        Some(last / 2),
        Some(last),
        None,
    ] {
        let q = CtrlerQuery(num);
        assert_eq!(
            copy.rsm.machine().query(&q),
            replica.rsm.machine().query(&q),
            "restored copy answers configuration {num:?} differently"
        );
    }
    assert_eq!(copy.rsm.snapshot().1, data, "re-snapshot differs");
    // A retried command is still answered from the restored session table.
    let client = 1 + (moves.max(1) - 1) % groups;
    let seq = 2 + (moves.max(1) - 1) / groups;
    let retry = CtrlerCommand::Move { shard: 0, gid: 1 };
    match (
        replica.rsm.prepare(client, seq, 0, &retry, 0),
        copy.rsm.prepare(client, seq, 0, &retry, 0),
    ) {
        (Prepared::Answered(a), Prepared::Answered(b)) => assert_eq!(a, b),
        other => panic!("a retry must be answered from the sessions: {other:?}"),
    }
    data.len()
}

#[test]
fn a_thousand_big_groups_and_a_thousand_moves_make_a_small_snapshot() {
    let size = big_history(1000, 1000);
    assert!(
        size < 64 << 20,
        "controller snapshot is {size} bytes, over 64 MiB"
    );
}

/// Joins beyond the documented limits are refused with one message, the same on every replica: a replica
/// that replays the log, or restores a snapshot and replays the rest, ends byte-identical.
#[test]
fn joins_beyond_the_limits_are_refused_the_same_on_replay() {
    let mut replica = Replica::new();
    let mut client = 0;
    let mut run = |replica: &mut Replica, groups: Vec<(Gid, Vec<String>)>| {
        client += 1;
        replica.command(
            client,
            1,
            CtrlerCommand::Join {
                groups: groups.into_iter().collect(),
                shards: 0,
            },
        )
    };
    let one = |gid: Gid, servers: usize, len: usize| -> (Gid, Vec<String>) {
        (gid, (0..servers).map(|_| long_address(gid, len)).collect())
    };
    let refused = |output: CtrlerOutput, what: &str| -> String {
        match output {
            Err(e) => e,
            Ok(answer) => panic!("{what} must be refused, got {answer:?}"),
        }
    };

    // Per group: servers, address length (empty or too long).
    let e = refused(
        run(&mut replica, vec![one(1, MAX_SERVERS_PER_GROUP + 1, 8)]),
        "too many servers",
    );
    assert_eq!(
        e,
        format!(
            "group 1 names {} servers, more than {MAX_SERVERS_PER_GROUP}",
            MAX_SERVERS_PER_GROUP + 1
        )
    );
    let e = refused(
        run(&mut replica, vec![one(2, 1, MAX_ADDRESS_BYTES + 1)]),
        "a too long address",
    );
    assert_eq!(
        e,
        format!(
            "group 2 has a server address of {} bytes (1 to {MAX_ADDRESS_BYTES} allowed)",
            MAX_ADDRESS_BYTES + 1
        )
    );
    let e = refused(
        run(&mut replica, vec![(3, vec![String::new()])]),
        "an empty address",
    );
    assert_eq!(
        e,
        format!("group 3 has a server address of 0 bytes (1 to {MAX_ADDRESS_BYTES} allowed)")
    );
    // At the limits is fine.
    let created = run(
        &mut replica,
        vec![one(4, MAX_SERVERS_PER_GROUP, MAX_ADDRESS_BYTES)],
    );
    assert_eq!(created, Ok(CtrlerAnswer::Created(1)));

    // Too many groups: in one join, and by growing past the limit.
    let e = refused(
        run(
            &mut replica,
            (10..10 + MAX_GROUPS as Gid + 1)
                .map(|g| one(g, 1, 4))
                .collect(),
        ),
        "too many groups at once",
    );
    assert_eq!(
        e,
        format!(
            "the join names {} groups, more than {MAX_GROUPS}",
            MAX_GROUPS + 1
        )
    );
    let fill = run(
        &mut replica,
        (10..10 + MAX_GROUPS as Gid - 1)
            .map(|g| one(g, 1, 4))
            .collect(),
    );
    assert_eq!(fill, Ok(CtrlerAnswer::Created(2)));
    let e = refused(
        run(&mut replica, vec![one(99_999, 1, 4)]),
        "one group too many",
    );
    assert_eq!(
        e,
        format!(
            "the configuration would have {} groups, more than {MAX_GROUPS}",
            MAX_GROUPS + 1
        )
    );
    // Room again after a leave; the total size of the servers is bounded too.
    let left = replica.command(
        1000,
        1,
        CtrlerCommand::Leave((10..10 + MAX_GROUPS as Gid - 1).collect()),
    );
    assert_eq!(left, Ok(CtrlerAnswer::Created(3)));
    let per_group = MAX_SERVERS_PER_GROUP * MAX_ADDRESS_BYTES;
    let fits = (MAX_CONFIG_SERVER_BYTES / per_group) as Gid;
    let e = refused(
        run(
            &mut replica,
            (100..100 + fits)
                .map(|g| one(g, MAX_SERVERS_PER_GROUP, MAX_ADDRESS_BYTES))
                .collect(),
        ),
        "servers over the total size",
    );
    assert_eq!(
        e,
        format!(
            "the configuration's server addresses would take {} bytes, more than {MAX_CONFIG_SERVER_BYTES}",
            (fits as usize + 1) * per_group
        )
    );
    let latest = replica.rsm.machine().latest().clone();
    assert_eq!(latest.num, 3, "refusals change nothing");
    assert_eq!(latest.groups.keys().copied().collect::<Vec<_>>(), vec![4]);

    // The service refuses what no configuration can hold before proposing it, with the same words.
    assert_eq!(
        check_join(&[one(1, MAX_SERVERS_PER_GROUP + 1, 8)].into_iter().collect()),
        Err(format!(
            "group 1 names {} servers, more than {MAX_SERVERS_PER_GROUP}",
            MAX_SERVERS_PER_GROUP + 1
        ))
    );

    // Replays: the whole log on a fresh replica, and a snapshot taken midway plus the rest.
    let (_, want) = replica.rsm.snapshot();
    let mut replay = Replica::new();
    replay.rsm.apply_entries(&replica.log).expect("replay");
    assert_eq!(replay.rsm.snapshot().1, want, "a replay differs");
    let mut midway = Replica::new();
    midway.rsm.apply_entries(&replica.log[..5]).expect("replay");
    let (mut restored, _) = midway.restored();
    restored
        .rsm
        .apply_entries(&replica.log[5..])
        .expect("replay");
    assert_eq!(restored.rsm.snapshot().1, want, "snapshot + replay differs");
    for c in 1..=client {
        let probe = CtrlerCommand::Leave(vec![4]);
        assert_eq!(
            replay.rsm.prepare(c, 1, 0, &probe, 0),
            replica.rsm.prepare(c, 1, 0, &probe, 0),
            "client {c}'s remembered outcome differs"
        );
    }
}
