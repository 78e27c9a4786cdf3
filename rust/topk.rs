//! A bounded selection of the k best (score, index) pairs.
//!
//! "Best" is a total order: higher score first, then lower index, so results do not depend on how the
//! reference was split between threads.

#[derive(Clone, Debug)]
pub struct TopK {
    k: usize,
    /// Candidates, unordered; at most 2k before they are cut back to the best k.
    items: Vec<(f32, u32)>,
    /// The k-th best score at the last cut (-inf before): a candidate must beat it to matter.
    threshold: f32,
}

/// `a` ranks before `b`.
#[inline]
fn better(a: &(f32, u32), b: &(f32, u32)) -> std::cmp::Ordering {
    b.0.total_cmp(&a.0).then(a.1.cmp(&b.1))
}

impl TopK {
    pub fn new(k: usize) -> Self {
        TopK {
            k,
            items: Vec::with_capacity(2 * k),
            threshold: f32::NEG_INFINITY,
        }
    }

    /// A candidate must score strictly above this to enter (candidates scanned in increasing index order
    /// can never win a tie against what is kept). It lags the true k-th best by at most k insertions,
    /// which lets a few extra candidates in but makes each insertion a plain append.
    #[inline]
    pub fn threshold(&self) -> f32 {
        self.threshold
    }

    /// Add a candidate (no threshold check: the caller filters). Amortised O(1).
    #[inline]
    pub fn push(&mut self, score: f32, index: u32) {
        self.items.push((score, index));
        if self.items.len() >= 2 * self.k.max(1) {
            self.cut();
        }
    }

    /// Keep the best k (a linear-time selection) and raise the threshold to the k-th best score.
    fn cut(&mut self) {
        if self.items.len() > self.k && self.k > 0 {
            self.items.select_nth_unstable_by(self.k - 1, better);
            self.items.truncate(self.k);
        } else if self.k == 0 {
            self.items.clear();
            return;
        }
        if self.items.len() == self.k {
            let kth = self.items.iter().map(|x| x.0).fold(f32::INFINITY, f32::min);
            self.threshold = self.threshold.max(kth);
        }
    }

    pub fn merge(&mut self, other: TopK) {
        for (s, i) in other.items {
            self.push(s, i);
        }
    }

    /// The best min(k, seen) pairs, best first.
    pub fn into_sorted(mut self) -> Vec<(f32, u32)> {
        self.cut();
        self.items.sort_unstable_by(better);
        self.items
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_best_with_index_tie_break() {
        let mut t = TopK::new(3);
        for (s, i) in [(0.5, 4), (0.9, 7), (0.5, 2), (0.1, 0), (0.9, 1), (0.5, 3)] {
            t.push(s, i);
        }
        assert_eq!(t.into_sorted(), vec![(0.9, 1), (0.9, 7), (0.5, 2)]);
    }

    #[test]
    fn merge_equals_single_pass() {
        let items: Vec<(f32, u32)> = (0..200).map(|i| (((i * 37) % 23) as f32, i)).collect();
        let mut whole = TopK::new(10);
        let (mut a, mut b) = (TopK::new(10), TopK::new(10));
        for &(s, i) in &items {
            whole.push(s, i);
            if i % 2 == 0 {
                a.push(s, i)
            } else {
                b.push(s, i)
            }
        }
        a.merge(b);
        assert_eq!(a.into_sorted(), whole.into_sorted());
    }
}
