use std::io::Cursor;

use super::super::{History, HistoryError, OpError, OpKind, Operation, Status};
use super::hist;

#[test]
fn parses_all_kinds_and_optional_fields() {
    let text = r#"{"client":1,"op":"put","key":"x","value":"a","invoke":0,"complete":10,"status":"ok"}
{"client":2,"op":"get","key":"x","output":"a","invoke":11,"complete":12,"status":"ok"}

{"client":2,"op":"cas","key":"x","expected":"a","value":"b","ok":true,"invoke":13,"complete":14,"status":"ok"}
{"client":3,"op":"cas","key":"x","expected":null,"value":"c","cas_ok":false,"invoke":15,"complete":16,"status":"ok"}
{"client":3,"op":"cas","key":"x","expected":"zz","value":"c","output":"false","invoke":17,"complete":18,"status":"ok"}
{"client":4,"op":"append","key":"x","value":"!","invoke":20,"status":"info"}
{"client":5,"op":"delete","key":"x","value":null,"output":null,"invoke":21,"complete":22,"status":"fail"}
"#;
    let h = History::from_jsonl(Cursor::new(text)).expect("valid history");
    assert_eq!(h.len(), 7);
    let ops = h.ops();
    assert_eq!(ops[0].op, OpKind::Put);
    assert_eq!(ops[1].output.as_deref(), Some("a"));
    assert_eq!(ops[2].cas_outcome(), Some(true));
    assert_eq!(ops[3].cas_outcome(), Some(false));
    assert_eq!(
        ops[4].cas_outcome(),
        Some(false),
        "output \"false\" fallback"
    );
    assert_eq!(ops[5].status, Status::Info);
    assert_eq!(ops[5].complete, None);
    assert_eq!(ops[5].effective_complete(), None);
    assert_eq!(ops[6].status, Status::Fail);
}

#[test]
fn malformed_json_names_the_line() {
    let text = "{\"client\":1,\"op\":\"put\",\"key\":\"x\",\"value\":\"a\",\"invoke\":0,\"complete\":1,\"status\":\"ok\"}\n\nnot json at all\n";
    let err = History::from_jsonl(Cursor::new(text)).expect_err("line 3 is garbage");
    assert!(
        matches!(err, HistoryError::Parse { line: 3, .. }),
        "{err:?}"
    );
    assert!(err.to_string().starts_with("line 3:"), "{err}");
}

#[test]
fn unknown_op_kind_names_the_line() {
    let text = "{\"client\":1,\"op\":\"frob\",\"key\":\"x\",\"invoke\":0,\"complete\":1,\"status\":\"ok\"}\n";
    let err = History::from_jsonl(Cursor::new(text)).expect_err("bad op kind");
    assert!(
        matches!(err, HistoryError::Parse { line: 1, .. }),
        "{err:?}"
    );
}

#[test]
fn invalid_records_name_the_line() {
    let cases = [
        (
            r#"{"client":1,"op":"get","key":"x","invoke":5,"status":"ok"}"#,
            OpError::MissingComplete(Status::Ok),
        ),
        (
            r#"{"client":1,"op":"put","key":"x","invoke":5,"complete":6,"status":"ok"}"#,
            OpError::MissingValue(OpKind::Put),
        ),
        (
            r#"{"client":1,"op":"get","key":"x","invoke":5,"complete":4,"status":"ok"}"#,
            OpError::CompleteBeforeInvoke {
                invoke: 5,
                complete: 4,
            },
        ),
        (
            r#"{"client":1,"op":"cas","key":"x","value":"v","invoke":5,"complete":6,"status":"ok"}"#,
            OpError::MissingCasOutcome,
        ),
    ];
    for (bad, want) in cases {
        let text = format!(
            "{}\n{}\n",
            r#"{"client":0,"op":"delete","key":"x","invoke":0,"complete":1,"status":"ok"}"#, bad
        );
        match History::from_jsonl(Cursor::new(text)) {
            Err(HistoryError::InvalidLine { line: 2, source }) => assert_eq!(source, want),
            other => panic!("expected InvalidLine at line 2, got {other:?}"),
        }
    }
}

#[test]
fn new_rejects_invalid_ops_with_index() {
    let mut bad = Operation::get(1, "x", None).ok_at(5, 6);
    bad.complete = None;
    let err = History::new(vec![Operation::delete(0, "x").ok_at(0, 1), bad])
        .expect_err("missing complete");
    assert!(
        matches!(err, HistoryError::InvalidOp { index: 1, .. }),
        "{err:?}"
    );
}

#[test]
fn round_trip_preserves_everything() {
    let h = hist(vec![
        Operation::put(1, "x", "a").ok_at(0, 10),
        Operation::get(2, "x", Some("a")).ok_at(5, 15),
        Operation::get(2, "y", None).ok_at(16, 17),
        Operation::append(3, "x", "b").info_at(20),
        Operation::cas(4, "x", Some("ab"), None, false).ok_at(21, 30),
        Operation::cas(4, "y", None, Some("q"), true).ok_at(31, 32),
        Operation::delete(5, "x").fail_at(40, 41),
        Operation::put(6, "weird \"key\"\n", "line\nbreak").ok_at(50, 60),
    ]);
    let mut buf = Vec::new();
    h.to_jsonl(&mut buf).expect("write to vec");
    let text = String::from_utf8(buf.clone()).expect("utf8");
    assert_eq!(text.lines().count(), h.len(), "one op per line");
    let back = History::from_jsonl(Cursor::new(buf)).expect("read back");
    assert_eq!(back, h);
}

#[test]
fn simulated_history_round_trips() {
    let h = super::sim::simulate(&super::sim::SimConfig {
        clients: 5,
        ops: 500,
        keys: 3,
        seed: 7,
        info_prob: 0.05,
        fail_prob: 0.05,
    });
    let mut buf = Vec::new();
    h.to_jsonl(&mut buf).expect("write");
    assert_eq!(History::from_jsonl(Cursor::new(buf)).expect("read"), h);
}
