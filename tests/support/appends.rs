//! The append workload of the process tests: clients append unique tokens and read, recording a
//! history; afterwards every acknowledged append must be present exactly once, in each client's
//! order, and the history must be linearizable (checked by `ds824::check`, with a tampered copy
//! that must fail, so the check is not vacuous).
#![allow(dead_code)]

use ds824::check::{check, CheckResult, History, KvModel, Operation};
use ds824::kv::{Clerk, KvOps};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Nanoseconds since the test started: one clock shared by every client, as the checker requires.
pub fn now_ns(start: Instant) -> u64 {
    start.elapsed().as_nanos() as u64
}

/// Keys the clients share.
pub const KEYS: usize = 3;
/// Clients per run.
pub const CLIENTS: u64 = 4;

/// One client's loop: append unique tokens (`c<client>.<n>;`) and read, recording every operation.
pub async fn client_loop(
    c: u64,
    mut clerk: Clerk,
    start: Instant,
    stop: Arc<AtomicBool>,
    history: Arc<Mutex<Vec<Operation>>>,
) {
    let mut n = 0u64;
    while !stop.load(Ordering::Relaxed) {
        n += 1;
        let key = format!("k{}", (c + n * 7 + n / 3) % KEYS as u64);
        let invoke = now_ns(start);
        let op = if n.is_multiple_of(3) {
            match clerk.get(&key).await {
                Ok(value) => Operation::get(c, &key, value.as_deref()).ok_at(invoke, now_ns(start)),
                Err(_) => Operation::get(c, &key, None).info_at(invoke),
            }
        } else {
            let token = format!("c{c}.{n};");
            match clerk.append(&key, &token).await {
                Ok(()) => Operation::append(c, &key, &token).ok_at(invoke, now_ns(start)),
                Err(_) => Operation::append(c, &key, &token).info_at(invoke),
            }
        };
        history.lock().expect("lock").push(op);
        // Pace the load: the point is many operations around each crash, not the longest values.
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// [`CLIENTS`] clients running [`client_loop`] against a cluster, recording one shared history.
pub struct Load {
    start: Instant,
    stop: Arc<AtomicBool>,
    history: Arc<Mutex<Vec<Operation>>>,
    clients: Vec<tokio::task::JoinHandle<()>>,
}

impl Load {
    /// Start the clients, each with a clerk from `clerk`.
    pub fn start(clerk: impl Fn() -> Clerk) -> Load {
        let start = Instant::now();
        let stop = Arc::new(AtomicBool::new(false));
        let history = Arc::new(Mutex::new(Vec::new()));
        let clients = (1..=CLIENTS)
            .map(|c| {
                tokio::spawn(client_loop(
                    c,
                    clerk(),
                    start,
                    stop.clone(),
                    history.clone(),
                ))
            })
            .collect();
        Load {
            start,
            stop,
            history,
            clients,
        }
    }

    /// Operations recorded so far.
    pub fn ops_so_far(&self) -> usize {
        self.history.lock().expect("lock").len()
    }

    /// Wait until the clients recorded `more` operations beyond those so far (within `wait`):
    /// proof that the cluster serves.
    pub async fn wait_for_more(&self, more: usize, wait: Duration, what: &str) {
        let target = self.ops_so_far() + more;
        let deadline = Instant::now() + wait;
        while self.ops_so_far() < target {
            assert!(Instant::now() < deadline, "clients made no progress {what}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Stop the clients; verify the history against the final state read through `clerk`.
    pub async fn finish_and_verify(self, clerk: &mut Clerk) {
        self.stop.store(true, Ordering::Relaxed);
        for client in self.clients {
            client.await.expect("client task");
        }
        let ops = self.history.lock().expect("lock").clone();
        verify(ops, clerk, self.start).await;
    }
}

/// Check what the clients recorded against the cluster's final state (read through `clerk`).
pub async fn verify(ops: Vec<Operation>, clerk: &mut Clerk, start: Instant) {
    // Every acknowledged append is present exactly once, in each client's order; nothing else is.
    let mut acknowledged: HashMap<String, HashSet<String>> = HashMap::new();
    let mut attempted: HashMap<String, HashSet<String>> = HashMap::new();
    for op in ops.iter().filter(|o| o.op == ds824::check::OpKind::Append) {
        let token = op.value.clone().expect("append value");
        attempted
            .entry(op.key.clone())
            .or_default()
            .insert(token.clone());
        if op.status == ds824::check::Status::Ok {
            acknowledged
                .entry(op.key.clone())
                .or_default()
                .insert(token);
        }
    }
    let info = ops
        .iter()
        .filter(|o| o.status == ds824::check::Status::Info)
        .count();
    for k in 0..KEYS {
        let key = format!("k{k}");
        let value = clerk
            .get(&key)
            .await
            .expect("final get")
            .unwrap_or_default();
        let tokens: Vec<String> = value.split_inclusive(';').map(str::to_string).collect();
        let mut seen = HashSet::new();
        let mut last_per_client: BTreeMap<u64, u64> = BTreeMap::new();
        for token in &tokens {
            assert!(seen.insert(token.clone()), "{key}: {token} applied twice");
            assert!(
                attempted.get(&key).is_some_and(|a| a.contains(token)),
                "{key}: {token} was never appended"
            );
            let (client, n) = token
                .trim_start_matches('c')
                .trim_end_matches(';')
                .split_once('.')
                .map(|(c, n)| {
                    (
                        c.parse::<u64>().expect("client"),
                        n.parse::<u64>().expect("n"),
                    )
                })
                .expect("token shape");
            let last = last_per_client.entry(client).or_insert(0);
            assert!(n > *last, "{key}: client {client}'s appends out of order");
            *last = n;
        }
        for token in acknowledged.get(&key).into_iter().flatten() {
            assert!(
                seen.contains(token),
                "{key}: acknowledged {token} is missing"
            );
        }
    }

    let history = History::new(ops).expect("well-formed history");
    eprintln!(
        "{} operations ({info} indeterminate) in {:.1} s",
        history.len(),
        start.elapsed().as_secs_f64()
    );
    // The history is not vacuous: one impossible read makes it fail.
    let mut tampered = history.ops().to_vec();
    let read = tampered
        .iter()
        .position(|o| o.op == ds824::check::OpKind::Get && o.status == ds824::check::Status::Ok)
        .expect("some read succeeded");
    tampered[read].output = Some("never written;".into());
    let tampered = History::new(tampered).expect("well-formed history");
    assert!(check(&tampered, &KvModel, Duration::from_secs(60)).is_violation());

    let result = check(&history, &KvModel, Duration::from_secs(60));
    if !result.is_ok() {
        // Keep the evidence: `kvctl check <file>` replays the verdict.
        let path =
            std::env::temp_dir().join(format!("kv_process-history-{}.jsonl", std::process::id()));
        let mut out = Vec::new();
        history.to_jsonl(&mut out).expect("encode history");
        std::fs::write(&path, out).expect("write history");
        match result {
            CheckResult::Violation(v) => {
                panic!("not linearizable (history in {}):\n{v}", path.display())
            }
            unknown => panic!(
                "checker could not decide (make the history smaller; history in {}): {unknown}",
                path.display()
            ),
        }
    }
}
