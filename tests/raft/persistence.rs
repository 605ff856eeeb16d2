//! 6.824 lab 2C: persistence, Figure 8 and churn.

use crate::common::*;
use crate::replication::one_concurrently;
use bytes::Bytes;
use ds824::sim::{Actor, RaftCluster};
use rand::Rng;

#[test]
fn persist1() {
    let mut cfg = cluster("persist1", 3, true);
    cfg.one(cmd(11), 3, true);
    // Crash and re-start all.
    for i in 0..3 {
        cfg.start(i);
    }
    for i in 0..3 {
        cfg.disconnect(i);
        cfg.connect(i);
    }
    cfg.one(cmd(12), 3, true);
    let leader1 = cfg.check_one_leader();
    cfg.disconnect(leader1);
    cfg.start(leader1);
    cfg.connect(leader1);
    cfg.one(cmd(13), 3, true);
    let leader2 = cfg.check_one_leader();
    cfg.disconnect(leader2);
    cfg.one(cmd(14), 2, true);
    cfg.start(leader2);
    cfg.connect(leader2);
    cfg.wait(4, 3, None); // wait for leader2 to join before killing i3
    let i3 = (cfg.check_one_leader() + 1) % 3;
    cfg.disconnect(i3);
    cfg.one(cmd(15), 2, true);
    cfg.start(i3);
    cfg.connect(i3);
    cfg.one(cmd(16), 3, true);
    cfg.end("persist1");
}

#[test]
fn persist2() {
    let mut cfg = cluster("persist2", 5, true);
    let mut index = 1;
    for _ in 0..5 {
        cfg.one(cmd(10 + index), 5, true);
        index += 1;
        let leader1 = cfg.check_one_leader();
        cfg.disconnect((leader1 + 1) % 5);
        cfg.disconnect((leader1 + 2) % 5);
        cfg.one(cmd(10 + index), 3, true);
        index += 1;
        cfg.disconnect(leader1);
        cfg.disconnect((leader1 + 3) % 5);
        cfg.disconnect((leader1 + 4) % 5);
        cfg.start((leader1 + 1) % 5);
        cfg.start((leader1 + 2) % 5);
        cfg.connect((leader1 + 1) % 5);
        cfg.connect((leader1 + 2) % 5);
        cfg.sleep(ELECTION_TIMEOUT_MS);
        cfg.start((leader1 + 3) % 5);
        cfg.connect((leader1 + 3) % 5);
        cfg.one(cmd(10 + index), 3, true);
        index += 1;
        cfg.connect((leader1 + 4) % 5);
        cfg.connect(leader1);
    }
    cfg.one(cmd(1000), 5, true);
    cfg.end("persist2");
}

#[test]
fn persist3() {
    let mut cfg = cluster("persist3", 3, true);
    cfg.one(cmd(101), 3, true);
    let leader = cfg.check_one_leader();
    cfg.disconnect((leader + 2) % 3);
    cfg.one(cmd(102), 2, true);
    cfg.crash(leader);
    cfg.crash((leader + 1) % 3);
    cfg.connect((leader + 2) % 3);
    cfg.start(leader);
    cfg.connect(leader);
    cfg.one(cmd(103), 2, true);
    cfg.start((leader + 1) % 3);
    cfg.connect((leader + 1) % 3);
    cfg.one(cmd(104), 3, true);
    cfg.end("persist3");
}

fn figure8_pause(cfg: &mut RaftCluster) {
    let ms = if cfg.rng.random_range(0..1000) < 100 {
        cfg.rng.random_range(0..500)
    } else {
        cfg.rng.random_range(0..13)
    };
    cfg.sleep(ms);
}

/// Leaders crash right after appending, so many terms leave uncommitted entries behind; only the
/// Figure 8 rule keeps a later leader from committing (or overwriting) the wrong ones.
#[test]
fn figure8() {
    let mut cfg = cluster("figure8", 5, true);
    let c = rand_cmd(&mut cfg);
    cfg.one(c, 1, true);
    let mut nup = 5;
    for _ in 0..1000 {
        let mut leader = None;
        for i in 0..5 {
            if cfg.is_alive(i) {
                let c = rand_cmd(&mut cfg);
                if cfg.start_command(i, c).is_some() {
                    leader = Some(i);
                }
            }
        }
        figure8_pause(&mut cfg);
        if let Some(leader) = leader {
            cfg.crash(leader);
            nup -= 1;
        }
        if nup < 3 {
            let s = rand_server(&mut cfg);
            if !cfg.is_alive(s) {
                cfg.start(s);
                cfg.connect(s);
                nup += 1;
            }
        }
    }
    for i in 0..5 {
        if !cfg.is_alive(i) {
            cfg.start(i);
            cfg.connect(i);
        }
    }
    let c = rand_cmd(&mut cfg);
    cfg.one(c, 5, true);
    cfg.end("figure8");
}

#[test]
fn unreliable_agree() {
    let mut cfg = cluster("unreliable_agree", 5, false);
    for iters in 1..50u64 {
        let mut batch: Vec<(Bytes, usize)> = (0..4).map(|j| (cmd(100 * iters + j), 1)).collect();
        batch.push((cmd(iters), 1));
        one_concurrently(&mut cfg, batch);
    }
    cfg.set_reliable(true);
    cfg.one(cmd(100), 5, true);
    cfg.end("unreliable_agree");
}

#[test]
fn figure8_unreliable() {
    let mut cfg = cluster("figure8_unreliable", 5, false);
    let c = cmd(cfg.rng.random_range(0..10_000));
    cfg.one(c, 1, true);
    let mut nup = 5;
    for iters in 0..1000 {
        if iters == 200 {
            cfg.set_long_reordering(true);
        }
        let mut leader = None;
        for i in 0..5 {
            let c = cmd(cfg.rng.random_range(0..10_000));
            if cfg.start_command(i, c).is_some() && cfg.is_connected(i) {
                leader = Some(i);
            }
        }
        figure8_pause(&mut cfg);
        if let Some(leader) = leader {
            if cfg.rng.random_range(0..1000) < 500 {
                cfg.disconnect(leader);
                nup -= 1;
            }
        }
        if nup < 3 {
            let s = rand_server(&mut cfg);
            if !cfg.is_connected(s) {
                cfg.connect(s);
                nup += 1;
            }
        }
    }
    for i in 0..5 {
        if !cfg.is_connected(i) {
            cfg.connect(i);
        }
    }
    let c = cmd(cfg.rng.random_range(0..10_000));
    cfg.one(c, 5, true);
    cfg.end("figure8_unreliable");
}

/// A churn client: Start a random value on every live server, and record it if it is seen committed.
struct ChurnClient {
    me: u64,
    wake_at: Option<u64>,
    polling: Option<(u64, Bytes, usize)>,
    values: Vec<Bytes>,
}

const CHURN_POLLS: [u64; 5] = [10, 20, 50, 100, 200];

impl Actor<RaftCluster> for ChurnClient {
    fn next_wake(&self) -> Option<u64> {
        self.wake_at
    }

    fn wake(&mut self, cfg: &mut RaftCluster) {
        let now = cfg.now();
        if let Some((index, value, poll)) = self.polling.take() {
            let (nd, committed) = cfg.n_committed(index);
            if nd > 0 {
                if committed.as_ref() == Some(&value) {
                    self.values.push(value);
                }
            } else if poll < CHURN_POLLS.len() {
                self.wake_at = Some(now + CHURN_POLLS[poll]);
                self.polling = Some((index, value, poll + 1));
                return;
            }
        }
        let x: u64 = cfg.rng.random();
        let value = cmd(x);
        let mut index = None;
        for i in 0..cfg.len() {
            if let Some((i1, _)) = cfg.start_command(i, value.clone()) {
                index = Some(i1);
            }
        }
        match index {
            Some(index) => {
                self.polling = Some((index, value, 0));
                self.wake_at = Some(now);
            }
            None => self.wake_at = Some(now + 79 + self.me * 17),
        }
    }
}

fn churn(name: &str, unreliable: bool) {
    let mut cfg = cluster(name, 5, !unreliable);
    let mut clients: Vec<ChurnClient> = (0..3)
        .map(|me| ChurnClient {
            me,
            wake_at: Some(0),
            polling: None,
            values: Vec::new(),
        })
        .collect();
    let run = |cfg: &mut RaftCluster, clients: &mut Vec<ChurnClient>, ms: u64| {
        let until = cfg.now() + ms;
        let mut actors: Vec<&mut dyn Actor<RaftCluster>> = clients
            .iter_mut()
            .map(|c| c as &mut dyn Actor<RaftCluster>)
            .collect();
        cfg.run_until_with(until, &mut actors);
    };
    for _ in 0..20 {
        if cfg.rng.random_range(0..1000) < 200 {
            let i = rand_server(&mut cfg);
            cfg.disconnect(i);
        }
        if cfg.rng.random_range(0..1000) < 500 {
            let i = rand_server(&mut cfg);
            if !cfg.is_alive(i) {
                cfg.start(i);
            }
            cfg.connect(i);
        }
        if cfg.rng.random_range(0..1000) < 200 {
            let i = rand_server(&mut cfg);
            if cfg.is_alive(i) {
                cfg.crash(i);
            }
        }
        // Make crash/restart infrequent enough that the clients can still make progress.
        run(&mut cfg, &mut clients, ELECTION_TIMEOUT_MS * 7 / 10);
    }
    run(&mut cfg, &mut clients, ELECTION_TIMEOUT_MS);
    cfg.set_reliable(true);
    for i in 0..5 {
        if !cfg.is_alive(i) {
            cfg.start(i);
        }
        cfg.connect(i);
    }
    // Stop the clients.
    let values: Vec<Bytes> = clients.iter().flat_map(|c| c.values.clone()).collect();
    cfg.sleep(ELECTION_TIMEOUT_MS);
    let c = rand_cmd(&mut cfg);
    let last_index = cfg.one(c, 5, true);
    let mut really = Vec::new();
    for index in 1..=last_index {
        let v = cfg
            .wait(index, 5, None)
            .unwrap_or_else(|| cfg.fail(format!("index {index} not committed on all")));
        really.push(v);
    }
    assert!(!values.is_empty(), "the clients saw nothing committed");
    for v in &values {
        assert!(
            really.contains(v),
            "didn't find a value the clients saw committed"
        );
    }
    cfg.end(name);
}

#[test]
fn reliable_churn() {
    churn("reliable_churn", false);
}

#[test]
fn unreliable_churn() {
    churn("unreliable_churn", true);
}

/// The exact situation of Figure 8 in the Raft paper, built with partitions instead of luck:
/// (a) leader A of term t1 stores x1 at index 1 on A and B only; (b) C/D/E elect L2 in term t2 > t1,
/// which stores x2 at index 1 locally and crashes; (c) A or B leads term t3 and replicates x1 to a
/// majority — it must **not** count that as committed, because x1 is from an older term; (d) L2 returns
/// with two nodes that lack t2 and wins (its log is more up to date), overwriting x1 with x2. With the
/// Figure 8 rule broken, x1 is applied in (c) and x2 in (d), and the checker reports two commands at one
/// index.
#[test]
fn figure8_scripted() {
    let mut cfg = cluster("figure8_scripted", 5, true);
    let a = cfg.check_one_leader();
    let [b, c, d, e] = [1, 2, 3, 4].map(|k| (a + k) % 5);
    // (a) x1 reaches only A and B.
    for s in [c, d, e] {
        cfg.disconnect(s);
    }
    let (index, t1) = cfg
        .start_command(a, cmd(1))
        .unwrap_or_else(|| cfg.fail("A rejected Start()"));
    assert_eq!(index, 1);
    cfg.sleep(50);
    assert_eq!(cfg.n_committed(1).0, 0, "x1 committed without a majority");
    // (b) C, D and E elect L2, which appends x2 and crashes before x2 reaches anyone else.
    cfg.crash(a);
    cfg.disconnect(b);
    for s in [c, d, e] {
        cfg.connect(s);
    }
    let l2 = cfg.check_one_leader();
    let (index, t2) = cfg
        .start_command(l2, cmd(2))
        .unwrap_or_else(|| cfg.fail("L2 rejected Start()"));
    assert_eq!(index, 1);
    assert!(t2 > t1);
    // Cut off before its AppendEntries arrive (a leader sends them before its own flush), given time
    // to flush x2, then crashed: x2 is on L2's disk and nowhere else.
    cfg.disconnect(l2);
    cfg.sleep(50);
    cfg.crash(l2);
    let [p, q]: [usize; 2] = [c, d, e]
        .into_iter()
        .filter(|&s| s != l2)
        .collect::<Vec<_>>()
        .try_into()
        .unwrap_or_else(|_| cfg.fail("expected two survivors"));
    // (c) A or B leads term t3 and replicates x1 to P and Q.
    cfg.start(a);
    cfg.connect(a);
    cfg.connect(b);
    let l3 = cfg.check_one_leader();
    assert!(l3 == a || l3 == b, "only A or B can win term t3");
    cfg.sleep(500);
    // (d) Without A and B, L2 wins over P and Q and overwrites index 1 with x2.
    cfg.crash(a);
    cfg.crash(b);
    cfg.start(l2);
    cfg.connect(l2);
    let l4 = cfg.check_one_leader();
    assert_eq!(l4, l2, "L2 has the most up-to-date log among L2, P and Q");
    cfg.one(cmd(3), 3, true);
    assert_eq!(cfg.n_committed(1).1, Some(cmd(2)));
    assert!(cfg.applied_at(p, 1).is_some() && cfg.applied_at(q, 1).is_some());
    // Everyone back: the log converges.
    cfg.start(a);
    cfg.start(b);
    for s in 0..5 {
        cfg.connect(s);
    }
    cfg.one(cmd(4), 5, true);
    cfg.end("figure8_scripted");
}
