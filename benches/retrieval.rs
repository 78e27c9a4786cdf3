//! `cargo bench`: retrieval throughput of bleep-core (search, and search + aggregation).
//! Side-by-side ratios against faiss / numpy / torch come from `benches/bench_retrieval.py`.

use bleep_core::{normalise_rows, Dtype, Expression, PackedIndex, Table, Write};
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};

const D: usize = 256;
const K: usize = 50;
const Q: usize = 2048;

fn random_unit(n: usize, seed: u64) -> Vec<f32> {
    let mut s = seed;
    let mut v: Vec<f32> = (0..n * D)
        .map(|_| {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((s >> 40) as f32 / (1u64 << 24) as f32) - 0.5
        })
        .collect();
    normalise_rows(&mut v, D);
    v
}

fn search(c: &mut Criterion) {
    let mut group = c.benchmark_group("search");
    group.sample_size(10);
    let queries = random_unit(Q, 1);
    for n in [10_000, 100_000] {
        let index = PackedIndex::new(random_unit(n, 2), n, D).unwrap();
        group.throughput(Throughput::Elements(Q as u64));
        group.bench_with_input(BenchmarkId::new("d256_k50", n), &n, |b, _| {
            b.iter(|| index.search(&queries, Q, K))
        });
    }
    group.finish();
}

fn search_and_aggregate(c: &mut Criterion) {
    let mut group = c.benchmark_group("impute");
    group.sample_size(10);
    let (n, g) = (100_000, 3_000);
    let queries = random_unit(Q, 3);
    let index = PackedIndex::new(random_unit(n, 4), n, D).unwrap();
    let values: Vec<f32> = (0..n * g).map(|i| (i % 97) as f32 * 0.1).collect();
    let nb = index.search(&queries, Q, K).unwrap();
    let w = vec![1.0 / K as f32; Q * K];
    let mut out = vec![0.0f32; Q * g];
    group.throughput(Throughput::Elements(Q as u64));
    for dtype in [Dtype::F32, Dtype::Bf16] {
        let table = Expression::new(&Table::from_f32(&values, dtype), n, g).unwrap();
        group.bench_function(BenchmarkId::new("aggregate_g3000", dtype.name()), |b| {
            b.iter(|| table.gather_weighted_sum(&nb.indices, &w, K, &mut out, Write::Store))
        });
        group.bench_function(
            BenchmarkId::new("search_and_aggregate", dtype.name()),
            |b| {
                b.iter(|| {
                    let nb = index.search(&queries, Q, K).unwrap();
                    table.gather_weighted_sum(&nb.indices, &w, K, &mut out, Write::Store)
                })
            },
        );
    }
    group.finish();
}

criterion_group!(benches, search, search_and_aggregate);
criterion_main!(benches);
