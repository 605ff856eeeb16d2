//! One test per 6.824 lab 4B scenario, with the Go test's steps and assertions.

use crate::common::*;
use ds824::shardkv::key_to_shard;
use ds824::sim::shardkv::{gid_of, ShardOp, ShardWorld};
use ds824::sim::Actor;
use rand::Rng;

/// Put a `len`-char random value to each key; the values.
fn put_all(
    world: &mut ShardWorld,
    clerk: &mut ds824::sim::shardkv::ShardClerk,
    keys: &[String],
    len: usize,
) -> Vec<String> {
    keys.iter()
        .map(|key| {
            let value = randstring(world, len);
            world.put(clerk, key, &value);
            value
        })
        .collect()
}

/// Ten appending clients, one per key.
fn appenders(
    world: &mut ShardWorld,
    keys: &[String],
    values: &[String],
    len: usize,
    interval_ms: u64,
) -> Vec<Appender> {
    keys.iter()
        .zip(values)
        .map(|(key, value)| Appender::new(world.make_clerk(), key, value, len, interval_ms))
        .collect()
}

/// Stop the clients and check that each key holds exactly what its client appended.
fn stop_and_check(world: &mut ShardWorld, clients: &mut [Appender]) {
    stop(world, clients);
    let mut clerk = world.make_clerk();
    for client in clients.iter() {
        let got = world.get(&mut clerk, client.key());
        if got != client.expected {
            world.fail(format!(
                "Get({}): expected:\n{}\nreceived:\n{got}",
                client.key(),
                client.expected
            ));
        }
    }
    check_linearizable(world);
}

/// Shards group `gi` owns in the controller's latest configuration.
fn owned_by(world: &ShardWorld, gi: usize) -> Vec<u64> {
    let config = world.latest_config();
    (0..config.shards.len() as u64)
        .filter(|&s| config.shards[s as usize] == gid_of(gi))
        .collect()
}

#[test]
fn static_shards() {
    let mut world = world("static_shards", true, None);
    let mut clerk = world.make_clerk();
    world.join(0);
    world.join(1);
    let keys = keys(10);
    let values = put_all(&mut world, &mut clerk, &keys, 20);
    check_all(&mut world, &mut clerk, &keys, &values);

    // Make sure that the data really is sharded: with group 1 down, only group 0's half answers.
    world.shutdown_group(1);
    world.check_logs();
    let mut gets: Vec<OneOp> = keys
        .iter()
        .map(|k| OneOp::new(world.make_clerk(), ShardOp::Get(k.clone())))
        .collect();
    let mut done = 0;
    loop {
        let mut actors: Vec<&mut dyn Actor<ShardWorld>> = gets
            .iter_mut()
            .map(|g| g as &mut dyn Actor<ShardWorld>)
            .collect();
        world.run_for(2000, &mut actors);
        let now_done = gets.iter().filter(|g| g.done.is_some()).count();
        if now_done == done {
            break;
        }
        done = now_done;
    }
    if done != 5 {
        world.fail(format!(
            "expected 5 completions with one shard dead; got {done}"
        ));
    }
    for (get, value) in gets.iter().zip(&values) {
        if let Some(output) = &get.done {
            assert_eq!(output.value.as_deref(), Some(value.as_str()));
        }
    }
    world.start_group(1);
    check_all(&mut world, &mut clerk, &keys, &values);
    world.end("static_shards");
}

#[test]
fn join_leave() {
    let mut world = world("join_leave", true, None);
    let mut clerk = world.make_clerk();
    world.join(0);
    let keys = keys(10);
    let mut values = put_all(&mut world, &mut clerk, &keys, 5);
    check_all(&mut world, &mut clerk, &keys, &values);

    world.join(1);
    check_and_append(&mut world, &mut clerk, &keys, &mut values);
    world.leave(0);
    check_and_append(&mut world, &mut clerk, &keys, &mut values);

    // Allow time for shards to transfer.
    world.sleep(1000);
    world.check_logs();
    world.shutdown_group(0);
    check_all(&mut world, &mut clerk, &keys, &values);
    world.end("join_leave");
}

#[test]
fn snapshot() {
    let mut world = world("snapshot", true, Some(1000));
    let mut clerk = world.make_clerk();
    world.join(0);
    let keys = keys(30);
    let mut values = put_all(&mut world, &mut clerk, &keys, 20);
    check_all(&mut world, &mut clerk, &keys, &values);

    world.join(1);
    world.join(2);
    world.leave(0);
    check_and_append(&mut world, &mut clerk, &keys, &mut values);
    world.leave(1);
    world.join(0);
    check_and_append(&mut world, &mut clerk, &keys, &mut values);
    world.sleep(1000);
    check_all(&mut world, &mut clerk, &keys, &values);
    world.sleep(1000);
    world.check_logs();

    for gi in 0..3 {
        world.shutdown_group(gi);
    }
    for gi in 0..3 {
        world.start_group(gi);
    }
    check_all(&mut world, &mut clerk, &keys, &values);
    world.end("snapshot");
}

#[test]
fn miss_change() {
    let mut world = world("miss_change", true, Some(1000));
    let mut clerk = world.make_clerk();
    world.join(0);
    let keys = keys(10);
    let mut values = put_all(&mut world, &mut clerk, &keys, 20);
    check_all(&mut world, &mut clerk, &keys, &values);

    world.join(1);
    for gi in 0..3 {
        world.shutdown_server(gi, 0);
    }
    world.join(2);
    world.leave(1);
    world.leave(0);
    check_and_append(&mut world, &mut clerk, &keys, &mut values);
    world.join(1);
    check_and_append(&mut world, &mut clerk, &keys, &mut values);
    for gi in 0..3 {
        world.start_server(gi, 0);
    }
    check_and_append(&mut world, &mut clerk, &keys, &mut values);
    world.sleep(2000);

    for gi in 0..3 {
        world.shutdown_server(gi, 1);
    }
    world.join(0);
    world.leave(2);
    check_and_append(&mut world, &mut clerk, &keys, &mut values);
    for gi in 0..3 {
        world.start_server(gi, 1);
    }
    check_all(&mut world, &mut clerk, &keys, &values);
    world.end("miss_change");
}

#[test]
fn concurrent1() {
    let mut world = world("concurrent1", true, Some(100));
    let mut clerk = world.make_clerk();
    world.join(0);
    let keys = keys(10);
    let values = put_all(&mut world, &mut clerk, &keys, 5);
    let mut clients = appenders(&mut world, &keys, &values, 5, 10);

    run(&mut world, &mut clients, 150);
    world.join(1);
    run(&mut world, &mut clients, 500);
    world.join(2);
    run(&mut world, &mut clients, 500);
    world.leave(0);
    world.shutdown_group(0);
    run(&mut world, &mut clients, 100);
    world.shutdown_group(1);
    run(&mut world, &mut clients, 100);
    world.shutdown_group(2);
    world.leave(2);
    run(&mut world, &mut clients, 100);
    for gi in 0..3 {
        world.start_group(gi);
    }
    run(&mut world, &mut clients, 100);
    world.join(0);
    world.leave(1);
    run(&mut world, &mut clients, 500);
    world.join(1);
    run(&mut world, &mut clients, 1000);
    stop_and_check(&mut world, &mut clients);
    world.end("concurrent1");
}

#[test]
fn concurrent2() {
    let mut world = world("concurrent2", true, None);
    let mut clerk = world.make_clerk();
    world.join(1);
    world.join(0);
    world.join(2);
    let keys = keys(10);
    let values = put_all(&mut world, &mut clerk, &keys, 1);
    let mut clients = appenders(&mut world, &keys, &values, 1, 50);

    world.leave(0);
    world.leave(2);
    run(&mut world, &mut clients, 3000);
    world.join(0);
    world.join(2);
    world.leave(1);
    run(&mut world, &mut clients, 3000);
    world.join(1);
    world.leave(0);
    world.leave(2);
    run(&mut world, &mut clients, 3000);
    world.shutdown_group(1);
    world.shutdown_group(2);
    run(&mut world, &mut clients, 1000);
    world.start_group(1);
    world.start_group(2);
    run(&mut world, &mut clients, 2000);
    stop_and_check(&mut world, &mut clients);
    world.end("concurrent2");
}

#[test]
fn concurrent3() {
    concurrent3_with("concurrent3", false);
}

/// TestConcurrent3 (joins, leaves and every group restarted while clients append and check), with
/// follower reads on or off; returns how many Gets followers served.
pub fn concurrent3_with(name: &str, follower_reads: bool) -> u64 {
    let mut world = world_with(name, true, Some(300), follower_reads);
    let mut clerk = world.make_clerk();
    world.join(0);
    let keys = keys(10);
    let values = put_all(&mut world, &mut clerk, &keys, 1);
    let mut clients = appenders(&mut world, &keys, &values, 1, 0);

    let until = world.now() + 12_000;
    while world.now() < until {
        world.join(2);
        world.join(1);
        let pause = world.rng.random_range(0..900);
        run(&mut world, &mut clients, pause);
        for gi in 0..3 {
            world.shutdown_group(gi);
        }
        for gi in 0..3 {
            world.start_group(gi);
        }
        let pause = world.rng.random_range(0..900);
        run(&mut world, &mut clients, pause);
        world.leave(1);
        world.leave(2);
        let pause = world.rng.random_range(0..900);
        run(&mut world, &mut clients, pause);
    }
    run(&mut world, &mut clients, 2000);
    stop_and_check(&mut world, &mut clients);
    world.end(name);
    world.reads_served_by_followers()
}

#[test]
fn unreliable1() {
    let mut world = world("unreliable1", false, Some(100));
    let mut clerk = world.make_clerk();
    world.join(0);
    let keys = keys(10);
    let mut values = put_all(&mut world, &mut clerk, &keys, 5);
    world.join(1);
    world.join(2);
    world.leave(0);
    for round in 0..20 {
        let i = round % keys.len();
        let got = world.get(&mut clerk, &keys[i]);
        if got != values[i] {
            world.fail(format!(
                "Get({}): expected {} got {got}",
                keys[i], values[i]
            ));
        }
        let x = randstring(&mut world, 5);
        world.append(&mut clerk, &keys[i], &x);
        values[i].push_str(&x);
    }
    world.join(0);
    world.leave(1);
    for round in 0..20 {
        let i = round % keys.len();
        let got = world.get(&mut clerk, &keys[i]);
        if got != values[i] {
            world.fail(format!(
                "Get({}): expected {} got {got}",
                keys[i], values[i]
            ));
        }
    }
    world.end("unreliable1");
}

/// The config changes of TestUnreliable2 and 3 while `clients` run.
fn unreliable_changes(world: &mut ShardWorld, clients: &mut [Appender]) {
    run(world, clients, 150);
    world.join(1);
    run(world, clients, 500);
    world.join(2);
    run(world, clients, 500);
    world.leave(0);
    run(world, clients, 500);
    world.leave(1);
    run(world, clients, 500);
    world.join(1);
    world.join(0);
    run(world, clients, 2000);
}

#[test]
fn unreliable2() {
    let mut world = world("unreliable2", false, Some(100));
    let mut clerk = world.make_clerk();
    world.join(0);
    let keys = keys(10);
    let values = put_all(&mut world, &mut clerk, &keys, 5);
    let mut clients = appenders(&mut world, &keys, &values, 5, 0);
    unreliable_changes(&mut world, &mut clients);
    world.set_reliable(true);
    stop_and_check(&mut world, &mut clients);
    world.end("unreliable2");
}

#[test]
fn unreliable3() {
    unreliable3_with("unreliable3", false);
}

/// TestUnreliable3 (random operations on a lossy network through configuration changes, checked
/// linearizable), with follower reads on or off; returns how many Gets followers served.
pub fn unreliable3_with(name: &str, follower_reads: bool) -> u64 {
    let mut world = world_with(name, false, Some(100), follower_reads);
    let mut clerk = world.make_clerk();
    world.join(0);
    let keys = keys(10);
    put_all(&mut world, &mut clerk, &keys, 5);
    let mut clients: Vec<Appender> = (0..10)
        .map(|_| Appender::random(world.make_clerk(), &keys))
        .collect();
    unreliable_changes(&mut world, &mut clients);
    world.set_reliable(true);
    stop(&mut world, &mut clients);
    if world.history().len() < 100 {
        world.fail(format!(
            "only {} operations completed",
            world.history().len()
        ));
    }
    check_linearizable(&world);
    world.end(name);
    world.reads_served_by_followers()
}

#[test]
fn challenge1_delete() {
    let mut world = world("challenge1_delete", true, Some(1));
    let mut clerk = world.make_clerk();
    world.join(0);
    let keys = keys(30);
    let values = put_all(&mut world, &mut clerk, &keys, 1000);
    check_all(&mut world, &mut clerk, &keys[..3], &values[..3]);

    for _ in 0..2 {
        world.join(1);
        world.leave(0);
        world.join(2);
        world.sleep(3000);
        check_all(&mut world, &mut clerk, &keys[..3], &values[..3]);
        world.leave(1);
        world.join(0);
        world.leave(2);
        world.sleep(3000);
        check_all(&mut world, &mut clerk, &keys[..3], &values[..3]);
    }
    world.join(1);
    world.join(2);
    for _ in 0..3 {
        world.sleep(1000);
        check_all(&mut world, &mut clerk, &keys[..3], &values[..3]);
    }

    let total = world.total_persisted();
    // 27 keys stored once, 3 that may also sit in dedup records, three replicas, plus slop.
    let expected = 3 * (((keys.len() - 3) * 1000) + 2 * 3 * 1000 + 6000);
    if total > expected {
        world.fail(format!(
            "snapshot + persisted Raft state are too big: {total} > {expected}"
        ));
    }
    check_all(&mut world, &mut clerk, &keys, &values);
    println!("challenge1_delete: {total} bytes persisted over 9 servers (limit {expected})");
    world.end("challenge1_delete");
}

#[test]
fn challenge2_unaffected() {
    let mut world = world("challenge2_unaffected", false, Some(100));
    let mut clerk = world.make_clerk();
    world.join(0);
    let keys = keys(10);
    for key in &keys {
        world.put(&mut clerk, key, "100");
    }
    world.join(1);
    let owned = owned_by(&world, 1);
    world.sleep(1000);
    let mine: Vec<&String> = keys
        .iter()
        .filter(|k| owned.contains(&key_to_shard(k, SHARDS)))
        .collect();
    if mine.is_empty() {
        world.fail("group 101 owns no key's shard");
    }
    for key in &mine {
        world.put(&mut clerk, key, "101");
    }
    // Group 100 dies and leaves: 101 can never receive 100's shards, but must keep serving its own.
    world.shutdown_group(0);
    world.leave(0);
    world.sleep(1000);
    for key in &mine {
        assert_eq!(world.get(&mut clerk, key), "101", "key {key}");
        world.put(&mut clerk, key, "101-1");
        assert_eq!(world.get(&mut clerk, key), "101-1", "key {key}");
    }
    world.end("challenge2_unaffected");
}

#[test]
fn challenge2_partial() {
    let mut world = world("challenge2_partial", false, Some(100));
    let mut clerk = world.make_clerk();
    world.joinm(&[0, 1, 2]);
    world.sleep(1000);
    let keys = keys(10);
    for key in &keys {
        world.put(&mut clerk, key, "100");
    }
    let owned = owned_by(&world, 2);
    // Group 100 dies; 100 and 102 leave: 101 takes everything, gets 102's shards from the live 102, and
    // must serve them while 100's never arrive.
    world.shutdown_group(0);
    world.leavem(&[0, 2]);
    world.sleep(1000);
    let moved: Vec<&String> = keys
        .iter()
        .filter(|k| owned.contains(&key_to_shard(k, SHARDS)))
        .collect();
    if moved.is_empty() {
        world.fail("group 102 owned no key's shard");
    }
    for key in &moved {
        assert_eq!(world.get(&mut clerk, key), "100", "key {key}");
        world.put(&mut clerk, key, "101-1");
        assert_eq!(world.get(&mut clerk, key), "101-1", "key {key}");
    }
    world.end("challenge2_partial");
}

/// Not a 6.824 scenario: every group leaves (the controller allows it: shards go to nobody), then groups
/// join again; the data must come back from where the last owner froze it.
#[test]
fn every_group_leaves_and_rejoins() {
    let mut world = world("every_group_leaves_and_rejoins", true, Some(1000));
    let mut clerk = world.make_clerk();
    world.join(0);
    let keys = keys(10);
    let mut values = put_all(&mut world, &mut clerk, &keys, 10);
    world.leave(0);
    world.sleep(1000);
    world.joinm(&[1, 2]);
    check_and_append(&mut world, &mut clerk, &keys, &mut values);
    world.leavem(&[1, 2]);
    world.sleep(1000);
    world.join(0);
    check_all(&mut world, &mut clerk, &keys, &values);
    world.end("every_group_leaves_and_rejoins");
}

/// Not a 6.824 test: the controller drops configurations every group has passed (the simulated groups
/// report their progress, and it keeps as few as it may), so a group that was down while the history
/// moved on, and joins afterwards, must jump over what was dropped rather than wait for it forever;
/// the data it is given, and what the others hand over later, must arrive whole.
#[test]
fn a_group_that_joins_after_its_history_was_dropped_catches_up() {
    let mut world = world(
        "a_group_that_joins_after_its_history_was_dropped_catches_up",
        true,
        None,
    );
    let mut clerk = world.make_clerk();
    world.shutdown_group(2);
    world.join(0);
    let keys = keys(10);
    let mut values = put_all(&mut world, &mut clerk, &keys, 10);
    for _ in 0..4 {
        world.join(1);
        check_and_append(&mut world, &mut clerk, &keys, &mut values);
        world.leave(1);
        check_and_append(&mut world, &mut clerk, &keys, &mut values);
    }
    world.sleep(1000);
    let (oldest, latest) = (world.oldest_config(), world.latest_config().num);
    if oldest + 1 < latest {
        world.fail(format!(
            "the controller keeps configurations {oldest}..={latest}, though every group running has passed them"
        ));
    }
    world.start_group(2);
    world.join(2);
    check_and_append(&mut world, &mut clerk, &keys, &mut values);
    world.leave(0);
    check_and_append(&mut world, &mut clerk, &keys, &mut values);
    let owned = owned_by(&world, 2);
    if owned.len() != SHARDS {
        world.fail(format!("group 2 owns {owned:?} after group 0 left"));
    }
    check_all(&mut world, &mut clerk, &keys, &values);
    check_linearizable(&world);
    world.end("a_group_that_joins_after_its_history_was_dropped_catches_up");
}

/// A sharded clerk's next operation begins in the tick its last one completed in (clients appending
/// back to back); the history must still put it strictly after (see the KV simulator's test of the
/// same name).
#[test]
fn a_clerks_operations_are_recorded_one_strictly_after_another() {
    let mut world = world("recorded_in_order", true, None);
    world.join(0);
    let keys = keys(3);
    let values = vec![String::new(); keys.len()];
    let mut clients = appenders(&mut world, &keys, &values, 5, 0);
    run(&mut world, &mut clients, 2_000);
    stop_and_check(&mut world, &mut clients);
    let mut last_completed: std::collections::HashMap<u64, u64> = Default::default();
    let mut checked = 0;
    for op in world.history() {
        if let Some(&done) = last_completed.get(&op.client) {
            assert!(
                done < op.invoke,
                "client {}: an op invoked at {} after its predecessor completed at {done}",
                op.client,
                op.invoke
            );
            checked += 1;
        }
        last_completed.insert(op.client, op.complete.expect("ok ops have completed"));
    }
    assert!(checked > 30, "only {checked} back-to-back pairs recorded");
}
