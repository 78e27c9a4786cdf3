//! A bounded selection of the k best (score, index) pairs.
//!
//! "Best" is a total order: higher score first, then lower index, so results do not depend on how the
//! reference was split between threads. With a margin m > 0 it keeps, besides the best k, every pair
//! within m of the k-th best score: when scores are approximations good to m/2, the exact top k is
//! among what it keeps.

#[derive(Clone, Debug)]
pub struct TopK {
    k: usize,
    /// Candidates, unordered; cut back (to the best k and those within the margin) at `capacity`.
    items: Vec<(f32, u32)>,
    /// The k-th best score at the last cut minus the margin (-inf before): a candidate must beat it.
    threshold: f32,
    margin: f32,
    /// Cut when this many candidates are held.
    capacity: usize,
}

/// `a` ranks before `b`.
#[inline]
fn better(a: &(f32, u32), b: &(f32, u32)) -> std::cmp::Ordering {
    b.0.total_cmp(&a.0).then(a.1.cmp(&b.1))
}

impl TopK {
    pub fn new(k: usize) -> Self {
        Self::with_margin(k, 0.0)
    }

    pub fn with_margin(k: usize, margin: f32) -> Self {
        TopK {
            k,
            items: Vec::with_capacity(2 * k),
            threshold: f32::NEG_INFINITY,
            margin,
            capacity: 2 * k.max(1),
        }
    }

    /// A candidate must score strictly above this to enter (candidates scanned in increasing index order
    /// can never win a tie against what is kept). It is updated only at cuts, so it lags the true k-th
    /// best, which lets a few extra candidates in but makes each insertion a plain append.
    #[inline]
    pub fn threshold(&self) -> f32 {
        self.threshold
    }

    /// Add a candidate (no threshold check: the caller filters). Amortised O(1).
    #[inline]
    pub fn push(&mut self, score: f32, index: u32) {
        self.items.push((score, index));
        if self.items.len() >= self.capacity {
            self.cut();
        }
    }

    /// Keep every pair scoring at least the k-th best score (ties included) or within the margin of it,
    /// and raise the threshold to match. A linear-time selection on the scores alone (the tie-break by
    /// index is left to `into_sorted`), then one pass over the rest.
    fn cut(&mut self) {
        let k = self.k;
        if k == 0 {
            self.items.clear();
        } else if self.items.len() >= k {
            self.items
                .select_nth_unstable_by(k - 1, |a, b| b.0.total_cmp(&a.0));
            let kth = self.items[k - 1].0;
            let floor = kth - self.margin;
            let mut keep = k;
            for i in k..self.items.len() {
                let s = self.items[i].0;
                if s > floor || s == kth {
                    self.items.swap(keep, i);
                    keep += 1;
                }
            }
            self.items.truncate(keep);
            self.threshold = self.threshold.max(floor);
        }
        // Room for as many new candidates as are kept, at least k: appends stay amortised O(1).
        self.capacity = 2 * self.items.len().max(k).max(1);
    }

    pub fn merge(&mut self, other: TopK) {
        for (s, i) in other.items {
            self.push(s, i);
        }
    }

    /// The best min(k, seen) pairs, best first (with a margin: also those within it, after them).
    pub fn into_sorted(mut self) -> Vec<(f32, u32)> {
        self.cut();
        self.items.sort_unstable_by(better);
        if self.margin == 0.0 {
            self.items.truncate(self.k);
        }
        self.items
    }

    /// Everything kept, unordered (with a margin: the candidates to rescore).
    pub fn into_items(mut self) -> Vec<(f32, u32)> {
        self.cut();
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
    fn margin_keeps_near_misses() {
        let mut t = TopK::with_margin(2, 0.1);
        for (s, i) in [
            (0.5, 0),
            (0.95, 1),
            (0.42, 2),
            (0.9, 3),
            (0.85, 4),
            (0.79, 5),
        ] {
            t.push(s, i);
        }
        // k-th best is 0.9: everything above 0.8 stays.
        assert_eq!(t.into_sorted(), vec![(0.95, 1), (0.9, 3), (0.85, 4)]);
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
