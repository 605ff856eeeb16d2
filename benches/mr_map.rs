//! How fast one map task reads and counts its split, per core: the number issue #17 targets (wc at
//! 250 MB/s per core or more). One 64 MiB generated file (the default split size), counted by `wc`
//! (the counting path: one table per task, byte-level tokeniser) and by `indexer` (the general path:
//! emitted pairs, no combiner), into 10 partitions.
//!
//! Run with `cargo bench --bench mr_map`; criterion prints the throughput in MiB/s.

use criterion::{criterion_group, criterion_main, Criterion, Throughput};

use ds824::mr::{app, corpus, exec};

fn map_throughput(c: &mut Criterion) {
    let dir = tempfile::tempdir().expect("temporary directory");
    let input = corpus::write_zipf_corpus(dir.path(), 1, 64 << 20, 1).expect("corpus")[0].clone();
    let bytes = std::fs::metadata(&input).expect("corpus size").len();
    let mut group = c.benchmark_group("map a 64 MiB split");
    group.throughput(Throughput::Bytes(bytes));
    group.sample_size(10);
    for name in ["wc", "indexer"] {
        let app = app::build(name, &[]).expect("app");
        group.bench_function(name, |b| {
            b.iter(|| exec::run_map(app.as_ref(), &input, 0, u64::MAX, 10).expect("map"))
        });
    }
    group.finish();
}

criterion_group!(benches, map_throughput);
criterion_main!(benches);
