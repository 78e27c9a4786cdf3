//! Damaged reference files: byte flips in the safetensors header (its length and its JSON) and
//! truncations anywhere, 2,000 cases. Loading each must be an error or a valid reference, never a
//! panic (proptest fails on one) or an abort.

use crate::{Dtype, Labels, Matrix, Reference};
use proptest::prelude::*;
use proptest::sample::Index;
use std::sync::OnceLock;

/// A saved reference: 3 spots, 4 dimensions, 2 genes, float16 expression, sections and provenance.
fn saved() -> &'static [u8] {
    static BYTES: OnceLock<Vec<u8>> = OnceLock::new();
    BYTES.get_or_init(|| {
        let emb: Vec<f32> = (0..12).map(|i| (i as f32 - 5.5) / 3.0).collect();
        let labels = Labels {
            genes: vec!["A".into(), "B".into()],
            sections: Some(vec!["s1".into(), "s1".into(), "s2".into()]),
            provenance: Some(r#"{"model": "test"}"#.into()),
            ..Default::default()
        };
        let r = Reference::build(
            Matrix::new(&emb, 3, 4),
            Matrix::new(&[1.0, 2.0, 3.0, 4.0, 5.0, 6.0], 3, 2),
            Dtype::F16,
            labels,
        )
        .unwrap();
        let path = scratch("base");
        r.save(&path).unwrap();
        let bytes = std::fs::read(&path).unwrap();
        std::fs::remove_file(&path).unwrap();
        bytes
    })
}

/// A file name of this process in the temporary folder.
fn scratch(case: &str) -> std::path::PathBuf {
    std::env::temp_dir().join(format!(
        "bleep-core-mutation-{}-{case}.safetensors",
        std::process::id()
    ))
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2000, failure_persistence: None, ..ProptestConfig::default() })]
    #[test]
    fn damaged_reference_headers_are_errors_or_references(
        flips in prop::collection::vec((any::<Index>(), any::<u8>()), 0..6),
        keep in prop::option::weighted(0.3, any::<Index>()),
        case in any::<u64>(),
    ) {
        let base = saved();
        let header = 8 + u64::from_le_bytes(base[..8].try_into().unwrap()) as usize;
        let mut bytes = base.to_vec();
        for (at, mask) in &flips {
            bytes[at.index(header)] ^= (*mask).max(1);
        }
        if let Some(k) = keep {
            bytes.truncate(k.index(bytes.len()));
        }
        let path = scratch(&case.to_string());
        std::fs::write(&path, &bytes).unwrap();
        if let Ok(r) = Reference::load(&path) {
            // A reference that loads is whole: it searches and imputes.
            let q = vec![1.0f32; r.dim()];
            r.impute(Matrix::new(&q, 1, r.dim()), 2, crate::Method::Mean).unwrap();
        }
        std::fs::remove_file(&path).unwrap();
    }
}
