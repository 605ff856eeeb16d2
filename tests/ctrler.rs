//! The shard controller scenarios of 6.824 (lab 4A) on the deterministic simulator: three controller
//! servers (Raft + rsm + `ShardCtrler`), clerks over the simulated network. Unlike the Go originals, the
//! minimal-transfer checks here are real: after a join no shard may move between old groups, after a
//! leave no shard may move between remaining groups.

use ds824::ctrler::{Config, CtrlerAnswer, CtrlerCommand, CtrlerQuery, Gid, ShardCtrler};
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
    })
}

fn servers(names: &[&str]) -> Vec<String> {
    names.iter().map(|s| s.to_string()).collect()
}

fn join_op(groups: &[(Gid, Vec<String>)]) -> ClerkOp<ShardCtrler> {
    ClerkOp::Command(CtrlerCommand::Join(groups.iter().cloned().collect()))
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
