//! The `chaos` harness end to end on the local target: real `kvd` processes in network namespaces,
//! killed and partitioned on a seeded schedule, the history checked — and nothing of the run left on
//! the machine afterwards. Needs root (namespaces, a bridge, iptables); without it the test fails and
//! says so, it is not skipped.

use ds824::check::History;
use std::path::Path;
use std::process::{Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

/// Longest a whole run (start, faulty phase, recovery, final reads, check) may take.
const RUN_LIMIT: Duration = Duration::from_secs(300);

fn require_root() {
    assert!(
        ds824::chaos::cluster::netns::is_root(),
        "tests/chaos.rs needs root: the local target creates network namespaces, a bridge and \
         iptables rules. Run it as root, e.g. `sudo -E cargo nextest run --test chaos`."
    );
}

/// What a finished `chaos run` left: its exit status, its tag, and what it printed.
struct Finished {
    status: ExitStatus,
    tag: String,
    output: String,
}

/// Run `chaos run ARGS --out OUT --kvd KVD` to the end (or fail the test at [`RUN_LIMIT`]); `args`
/// are separated by spaces, as typed.
fn chaos_run(args: &str, out: &Path) -> Finished {
    let log = out.with_extension("log");
    let file = std::fs::File::create(&log).expect("log file");
    let mut child = Command::new(env!("CARGO_BIN_EXE_chaos"))
        .arg("run")
        .args(args.split_whitespace())
        .arg("--out")
        .arg(out)
        .arg("--kvd")
        .arg(env!("CARGO_BIN_EXE_kvd"))
        .stdout(file.try_clone().expect("log file"))
        .stderr(file)
        .stdin(Stdio::null())
        .spawn()
        .expect("spawn chaos");
    let tag = format!("chaos-{}", child.id());
    let deadline = Instant::now() + RUN_LIMIT;
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait for chaos") {
            break status;
        }
        if Instant::now() > deadline {
            // SIGTERM: the harness cleans up as on Ctrl-C.
            let _ = Command::new("kill")
                .args(["-TERM", &child.id().to_string()])
                .status();
            let _ = child.wait();
            panic!(
                "chaos run did not finish within {RUN_LIMIT:?}:\n{}",
                std::fs::read_to_string(&log).unwrap_or_default()
            );
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    Finished {
        status,
        tag,
        output: std::fs::read_to_string(&log).unwrap_or_default(),
    }
}

/// Run `chaos run ARGS` into a fresh directory named `name` and require exit 0 (with the run's
/// output and the nodes' logs if not); returns the run, its directory (kept alive by the guard) and
/// its summary.
fn chaos_run_ok(args: &str, name: &str) -> (Finished, tempfile::TempDir, serde_json::Value) {
    require_root();
    let dir = tempfile::tempdir().expect("temp dir");
    let out = dir.path().join(name);
    let run = chaos_run(args, &out);
    assert_eq!(
        run.status.code(),
        Some(0),
        "chaos run failed:\n{}\n{}",
        run.output,
        node_logs(&out)
    );
    let summary = summary(&out);
    (run, dir, summary)
}

/// The last lines of every node's log, for a failure message.
fn node_logs(out: &Path) -> String {
    let mut text = String::new();
    for node in 1..=3 {
        let log =
            std::fs::read_to_string(out.join(format!("logs/node-{node}.log"))).unwrap_or_default();
        let tail: Vec<&str> = log.lines().rev().take(15).collect();
        text.push_str(&format!("--- node {node} ---\n"));
        for line in tail.iter().rev() {
            text.push_str(line);
            text.push('\n');
        }
    }
    text
}

fn shell(program: &str, args: &[&str]) -> String {
    let output = Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("run {program}: {e}"));
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// No namespace, link, firewall rule or process of run `tag` (whose files are under `out`) remains.
fn assert_nothing_left(tag: &str, out: &Path) {
    let ours = |name: &str| name == tag || name.starts_with(&format!("{tag}-"));
    let namespaces = shell("ip", &["netns", "list"]);
    assert!(
        !namespaces
            .lines()
            .filter_map(|l| l.split_whitespace().next())
            .any(ours),
        "namespaces of {tag} remain:\n{namespaces}"
    );
    let links = shell("ip", &["-o", "link", "show"]);
    assert!(
        !links.lines().any(|l| {
            l.split(": ")
                .nth(1)
                .is_some_and(|name| ours(name.split('@').next().unwrap_or(name)))
        }),
        "links of {tag} remain:\n{links}"
    );
    let rules = shell("iptables", &["-S", "FORWARD"]);
    assert!(
        !rules.contains(tag),
        "firewall rules of {tag} remain:\n{rules}"
    );
    let out = out.to_string_lossy();
    let mut survivors = Vec::new();
    for entry in std::fs::read_dir("/proc").expect("/proc").flatten() {
        let cmdline = std::fs::read(entry.path().join("cmdline")).unwrap_or_default();
        let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
        if cmdline.contains(out.as_ref()) && !cmdline.contains("chaos run") {
            survivors.push(cmdline);
        }
    }
    assert!(
        survivors.is_empty(),
        "processes of {tag} remain: {survivors:?}"
    );
}

fn summary(out: &Path) -> serde_json::Value {
    let text = std::fs::read_to_string(out.join("summary.json")).expect("summary.json");
    serde_json::from_str(&text).expect("summary.json is JSON")
}

fn count(summary: &serde_json::Value, field: &str) -> u64 {
    summary["stats"][field].as_u64().unwrap_or(0)
}

/// Runs starting together on one host get subnets of their own, even when their tags try the same
/// one first: choosing a free subnet and taking it are one step (before, both saw it free and both
/// took it, and the host routed one run's packets to the other's bridge).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn runs_starting_together_take_subnets_of_their_own() {
    use ds824::chaos::cluster::netns::{preferred_subnet, Network};
    require_root();
    // Tags no `chaos run` makes (those are chaos-<decimal pid>) and no other test process either:
    // this process's pid and a counter in letters, at most 13 bytes. Pairs of them that try the same
    // subnet first.
    let letters = |mut n: u32, width: usize| {
        let mut out = vec![b'a'; width];
        for slot in out.iter_mut().rev() {
            *slot = b'a' + (n % 26) as u8;
            n /= 26;
        }
        String::from_utf8(out).expect("ascii")
    };
    // 26^5 is above Linux's largest pid (4,194,304).
    let pid = letters(std::process::id(), 5);
    let tags: Vec<String> = (0..676)
        .map(|i| format!("chaos-{pid}{}", letters(i, 2)))
        .collect();
    let mut pairs = Vec::new();
    for (i, a) in tags.iter().enumerate() {
        if let Some(b) = tags[i + 1..]
            .iter()
            .find(|b| preferred_subnet(b) == preferred_subnet(a))
        {
            pairs.push((a.clone(), b.clone()));
        }
        if pairs.len() == 3 {
            break;
        }
    }
    assert_eq!(pairs.len(), 3, "no tags trying the same subnet first");
    for (a, b) in pairs {
        let (first, second) = tokio::join!(Network::create(&a, 1), Network::create(&b, 1));
        let first = first.expect("the first run's network");
        let second = second.expect("the second run's network");
        assert_ne!(
            first.host_ip(),
            second.host_ip(),
            "{a} and {b} took the same subnet"
        );
    }
}

#[test]
fn register_under_kill_and_partition_is_linearizable_and_leaves_nothing_behind() {
    let (run, dir, summary) = chaos_run_ok(
        "--target local --workload register --nemesis kill,partition --time 20s \
         --rate 100 --clients 5 --seed 7 --recovery-time 5s",
        "register",
    );
    let out = dir.path().join("register");
    assert_eq!(summary["verdict"], "valid", "{summary:#}");
    assert!(summary["faults"].as_u64().unwrap_or(0) >= 2, "{summary:#}");
    assert!(count(&summary, "ok") > 100, "{summary:#}");
    assert!(count(&summary, "ok_during_faults") > 0, "{summary:#}");
    assert!(count(&summary, "ok_after_heal") > 0, "{summary:#}");
    let file = std::fs::File::open(out.join("history.jsonl")).expect("history.jsonl");
    let history = History::from_jsonl(std::io::BufReader::new(file)).expect("a valid history");
    assert_eq!(history.len() as u64, count(&summary, "ops"));
    let events = std::fs::read_to_string(out.join("nemesis.jsonl")).expect("nemesis.jsonl");
    assert!(
        events.contains("\"phase\":\"start\"") && events.contains("heal-all"),
        "{events}"
    );
    // The nodes' logs were read, and through kills and elections no line grew long.
    let logs = summary["invariants"]
        .as_array()
        .and_then(|all| {
            all.iter()
                .find(|i| i["name"].as_str().is_some_and(|n| n.starts_with("logs:")))
        })
        .unwrap_or_else(|| panic!("no log invariant in {summary:#}"));
    assert_eq!(logs["holds"], true, "{logs:#}");
    assert_nothing_left(&run.tag, &out);
}

#[test]
fn append_under_pause_partition_and_loss_loses_and_doubles_nothing() {
    let (run, dir, summary) = chaos_run_ok(
        "--workload append --nemesis pause,partition,loss --time 15s --fault-window 3s \
         --heal-window 2s --rate 100 --clients 5 --seed 3 --recovery-time 5s",
        "append",
    );
    let out = dir.path().join("append");
    assert_eq!(summary["verdict"], "valid", "{summary:#}");
    let invariants = summary["invariants"].as_array().expect("invariants");
    let append = invariants
        .iter()
        .find(|i| i["name"].as_str().is_some_and(|n| n.starts_with("append")))
        .expect("the append invariant was checked");
    assert_eq!(append["holds"], true, "{summary:#}");
    assert!(
        append["detail"]
            .as_str()
            .is_some_and(|d| d.contains("exactly once")),
        "{summary:#}"
    );
    // Every key written was read back at the end, and those reads are in the history too.
    let file = std::fs::File::open(out.join("history.jsonl")).expect("history.jsonl");
    let history = History::from_jsonl(std::io::BufReader::new(file)).expect("a valid history");
    let final_reads = history
        .ops()
        .iter()
        .filter(|op| op.client == ds824::chaos::workload::FINAL_READER)
        .count();
    assert!(final_reads > 0, "no final reads recorded");
    assert_nothing_left(&run.tag, &out);
}

/// Lease and follower reads (issue #14): with `--lease-reads` the leader answers reads from its lease,
/// and with `--follower-reads` every node answers them at the read index the leader confirms (from its
/// lease too), the clients sending each read to the nodes in turn. A leader frozen by SIGSTOP past its
/// lease, or cut off by a partition, must stop answering from it before the others can elect someone
/// else (on waking it counts the time it lost before it looks at its lease); a follower cut off with a
/// deposed leader, or whose leader was killed or frozen, must not answer from what it applied. The
/// register history (reads and writes of the same keys) stays linearizable. One run for both, as each
/// chaos run takes the whole machine for half a minute.
#[test]
fn register_with_lease_and_follower_reads_under_kill_pause_and_partition_is_linearizable() {
    let (run, dir, summary) = chaos_run_ok(
        "--lease-reads --follower-reads --workload register --nemesis kill,pause,partition \
         --time 20s --fault-window 3s --heal-window 2s --rate 100 --clients 5 --seed 11 \
         --recovery-time 5s",
        "reads",
    );
    assert_eq!(summary["verdict"], "valid", "{summary:#}");
    assert!(summary["faults"].as_u64().unwrap_or(0) >= 2, "{summary:#}");
    assert!(count(&summary, "ok_during_faults") > 0, "{summary:#}");
    assert!(count(&summary, "ok_after_heal") > 0, "{summary:#}");
    assert_nothing_left(&run.tag, &dir.path().join("reads"));
}

/// `slow` puts every peer link behind the harness's TCP fault proxy: the history stays
/// linearizable, the proxy really carried the nodes' traffic (the record says how much), and writes
/// made while it did paid its delay (a write needs a round trip to a follower, so at least twice
/// --slow-delay), while nothing of it remains afterwards.
#[test]
fn register_under_slow_links_is_linearizable_and_pays_the_proxys_delay() {
    let (run, dir, summary) = chaos_run_ok(
        "--workload register --nemesis slow --time 16s --fault-window 5s --heal-window 3s \
         --slow-delay 150ms --slow-jitter 50ms --slow-reset-probability 0.01 \
         --rate 60 --clients 4 --seed 11 --recovery-time 4s",
        "slow",
    );
    let out = dir.path().join("slow");
    assert_eq!(summary["verdict"], "valid", "{summary:#}");
    let events = std::fs::read_to_string(out.join("nemesis.jsonl")).expect("nemesis.jsonl");
    let mut windows = Vec::new();
    let mut opened = None;
    for line in events.lines() {
        let event: serde_json::Value = serde_json::from_str(line).expect("an event");
        if event["fault"] != "slow" {
            continue;
        }
        let time = event["time"].as_u64().expect("time");
        match event["phase"].as_str() {
            Some("start") => opened = Some(time),
            Some("stop") => {
                let detail = event["detail"].as_str().unwrap_or_default();
                let proxied: u64 = detail
                    .split(" connection(s) proxied")
                    .next()
                    .and_then(|head| head.rsplit('(').next())
                    .and_then(|n| n.trim().parse().ok())
                    .unwrap_or(0);
                assert!(proxied >= 2, "the proxy carried no peer links: {detail}");
                windows.push((opened.take().expect("a start before the stop"), time));
            }
            _ => {}
        }
    }
    assert!(windows.len() >= 2, "{events}");
    let file = std::fs::File::open(out.join("history.jsonl")).expect("history.jsonl");
    let history = History::from_jsonl(std::io::BufReader::new(file)).expect("a valid history");
    // Writes invoked well inside a window (the proxy in place for 1 s already) that succeeded.
    let mut latencies: Vec<u64> = history
        .ops()
        .iter()
        .filter(|op| op.op != ds824::check::OpKind::Get)
        .filter(|op| op.status == ds824::check::Status::Ok)
        .filter(|op| {
            windows
                .iter()
                .any(|&(start, stop)| op.invoke > start + 1_000_000_000 && op.invoke < stop)
        })
        .filter_map(|op| Some(op.complete? - op.invoke))
        .collect();
    latencies.sort_unstable();
    assert!(
        latencies.len() >= 10,
        "{} writes in the windows",
        latencies.len()
    );
    let median_ms = latencies[latencies.len() / 2] / 1_000_000;
    assert!(
        median_ms >= 300,
        "median write in a slow window took {median_ms} ms: the proxy was not in the path"
    );
    assert_nothing_left(&run.tag, &out);
}

/// `clock` moves single nodes' wall clocks (the leader's too) by up to 5 minutes either way while
/// the nodes drop sessions idle for 60 s: a leader whose clock jumps ahead expires every session at
/// once, one whose clock falls behind stamps entries in the past. No acknowledged append may be lost
/// or doubled by either, and the history stays linearizable.
#[test]
fn append_under_clock_skew_loses_and_doubles_nothing() {
    let (run, dir, summary) = chaos_run_ok(
        "--workload append --nemesis clock --time 20s --fault-window 4s --heal-window 2s \
         --rate 60 --clients 4 --seed 5 --recovery-time 4s",
        "clock",
    );
    let out = dir.path().join("clock");
    assert_eq!(summary["verdict"], "valid", "{summary:#}");
    let invariants = summary["invariants"].as_array().expect("invariants");
    assert!(
        invariants.iter().any(
            |i| i["name"].as_str().is_some_and(|n| n.starts_with("append")) && i["holds"] == true
        ),
        "{summary:#}"
    );
    let events = std::fs::read_to_string(out.join("nemesis.jsonl")).expect("nemesis.jsonl");
    let skews = events
        .lines()
        .filter(|l| l.contains("\"phase\":\"start\"") && l.contains("\"fault\":\"clock\""))
        .count();
    assert!(skews >= 2, "{events}");
    // The nodes really read the moved clocks (and were set back).
    let logs: String = (1..=3)
        .map(|n| {
            std::fs::read_to_string(out.join(format!("logs/node-{n}.log"))).unwrap_or_default()
        })
        .collect();
    assert!(
        logs.lines()
            .filter(|l| l.contains("wall clock moved"))
            .count()
            >= 2 * skews,
        "{}",
        node_logs(&out)
    );
    assert_nothing_left(&run.tag, &out);
}

/// The harness judges itself: with every server carrying a deliberate safety bug (a write is
/// acknowledged once the leader appended it, before a majority has it), partitions lose acknowledged
/// writes, and the run passes only because the checker notices.
#[test]
fn the_self_test_catches_writes_acknowledged_before_they_commit() {
    require_root();
    let dir = tempfile::tempdir().expect("temp dir");
    let out = dir.path().join("self-test");
    let run = chaos_run(
        // Seed 5's schedule isolates the leader in its last window (whichever node leads then): the
        // appends it acknowledges alone are lost when the partition heals, and the final read shows it.
        "--self-test --workload append --nemesis partition --time 30s --fault-window 4s \
         --heal-window 2s --rate 100 --clients 5 --seed 5 --recovery-time 3s",
        &out,
    );
    let summary = summary(&out);
    assert_eq!(
        run.status.code(),
        Some(0),
        "the self-test's bug went unnoticed:\n{}\n{summary:#}",
        run.output
    );
    assert_eq!(summary["self_test"], true, "{summary:#}");
    let lost = summary["invariants"].as_array().is_some_and(|invariants| {
        invariants.iter().any(|i| {
            i["holds"] == false && i["detail"].as_str().is_some_and(|d| d.contains("lost"))
        })
    });
    assert!(
        lost || summary["linearizable"] == "violation",
        "{summary:#}"
    );
    assert_nothing_left(&run.tag, &out);
}

/// The bank workload under whole-cluster crashes: every node SIGKILLed at once and restarted, the
/// ledgers still add up, and availability is reported for that kind of fault from the moment the
/// last node came back.
#[test]
fn bank_under_restart_all_keeps_every_total_and_reports_the_outage_after_the_restart() {
    let (run, dir, summary) = chaos_run_ok(
        "--workload bank --nemesis restart-all --time 16s --fault-window 3s --heal-window 3s \
         --rate 100 --clients 5 --seed 4 --recovery-time 5s",
        "bank",
    );
    let out = dir.path().join("bank");
    assert_eq!(summary["verdict"], "valid", "{summary:#}");
    let invariants = summary["invariants"].as_array().expect("invariants");
    let bank = invariants
        .iter()
        .find(|i| i["name"].as_str().is_some_and(|n| n.starts_with("bank")))
        .expect("the bank invariant was checked");
    assert_eq!(bank["holds"], true, "{summary:#}");
    assert!(
        bank["detail"]
            .as_str()
            .is_some_and(|d| d.contains("totals 500")),
        "{summary:#}"
    );
    // Transfers happened: swaps that moved money, on several ledgers.
    let file = std::fs::File::open(out.join("history.jsonl")).expect("history.jsonl");
    let history = History::from_jsonl(std::io::BufReader::new(file)).expect("a valid history");
    let swapped: std::collections::BTreeSet<&str> = history
        .ops()
        .iter()
        .filter(|op| op.op == ds824::check::OpKind::Cas && op.cas_outcome() == Some(true))
        .filter(|op| op.expected.is_some())
        .map(|op| op.key.as_str())
        .collect();
    assert!(swapped.len() >= 2, "transfers on {swapped:?} only");
    // Every node was killed and restarted in each window; the outage is measured per kind.
    let events = std::fs::read_to_string(out.join("nemesis.jsonl")).expect("nemesis.jsonl");
    assert!(
        events.contains("\"kind\":\"restart-all\"") && events.contains("restart order"),
        "{events}"
    );
    let outages = summary["stats"]["outage_by_fault"]
        .as_array()
        .expect("outage_by_fault");
    let restart = outages
        .iter()
        .find(|o| o["kind"] == "restart-all")
        .expect("an outage figure for restart-all");
    assert!(restart["faults"].as_u64().unwrap_or(0) >= 2, "{summary:#}");
    assert_eq!(restart["measured_from"], "last node restarted");
    assert_eq!(restart["target_ms"], 5000);
    assert!(run.output.contains("restart-all:"), "{}", run.output);
    let report = std::fs::read_to_string(out.join("report.html")).expect("report.html");
    assert!(report.contains("class=\"outage-row\""), "no outage table");
    assert_nothing_left(&run.tag, &out);
}
