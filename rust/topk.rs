//! A bounded selection of the k best (score, index) pairs.
//!
//! "Best" is a total order: higher score first, then lower index, so results do not depend on how the
//! reference was split between threads.

#[derive(Clone, Debug)]
pub struct TopK {
    k: usize,
    /// A binary min-heap: the worst kept pair is at the root.
    heap: Vec<(f32, u32)>,
}

#[inline]
fn worse(a: (f32, u32), b: (f32, u32)) -> bool {
    a.0 < b.0 || (a.0 == b.0 && a.1 > b.1)
}

impl TopK {
    pub fn new(k: usize) -> Self {
        TopK {
            k,
            heap: Vec::with_capacity(k),
        }
    }

    /// A candidate must score strictly above this to enter (candidates scanned in increasing index order
    /// can never win a tie against what is kept).
    #[inline]
    pub fn threshold(&self) -> f32 {
        if self.heap.len() < self.k {
            f32::NEG_INFINITY
        } else {
            self.heap[0].0
        }
    }

    pub fn push(&mut self, score: f32, index: u32) {
        let item = (score, index);
        if self.heap.len() < self.k {
            self.heap.push(item);
            self.sift_up(self.heap.len() - 1);
        } else if self.k > 0 && worse(self.heap[0], item) {
            self.heap[0] = item;
            self.sift_down(0);
        }
    }

    pub fn merge(&mut self, other: TopK) {
        for (s, i) in other.heap {
            self.push(s, i);
        }
    }

    /// The kept pairs, best first.
    pub fn into_sorted(mut self) -> Vec<(f32, u32)> {
        self.heap
            .sort_unstable_by(|&a, &b| match (worse(a, b), worse(b, a)) {
                (true, _) => std::cmp::Ordering::Greater,
                (_, true) => std::cmp::Ordering::Less,
                _ => std::cmp::Ordering::Equal,
            });
        self.heap
    }

    fn sift_up(&mut self, mut i: usize) {
        while i > 0 {
            let parent = (i - 1) / 2;
            if worse(self.heap[i], self.heap[parent]) {
                self.heap.swap(i, parent);
                i = parent;
            } else {
                break;
            }
        }
    }

    fn sift_down(&mut self, mut i: usize) {
        let n = self.heap.len();
        loop {
            let (l, r) = (2 * i + 1, 2 * i + 2);
            let mut m = i;
            if l < n && worse(self.heap[l], self.heap[m]) {
                m = l;
            }
            if r < n && worse(self.heap[r], self.heap[m]) {
                m = r;
            }
            if m == i {
                break;
            }
            self.heap.swap(i, m);
            i = m;
        }
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
