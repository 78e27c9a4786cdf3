//! A borrowed row-major matrix: how callers hand tables to the core with their shape.

use crate::error::{Error, Result};

/// `rows x cols` values, row-major, borrowed. The shape is what the caller claims; functions that take
/// a `Matrix` check it against the data ([`Matrix::check`]) before using it.
#[derive(Clone, Copy, Debug)]
pub struct Matrix<'a, T> {
    /// The values, `rows * cols` of them.
    pub data: &'a [T],
    /// Number of rows.
    pub rows: usize,
    /// Number of columns.
    pub cols: usize,
}

impl<'a, T> Matrix<'a, T> {
    /// A matrix view of `data` with the given shape (checked on use).
    pub fn new(data: &'a [T], rows: usize, cols: usize) -> Self {
        Matrix { data, rows, cols }
    }

    /// The data, once its length is checked to be `rows * cols`; `what` names the matrix in the error.
    pub fn check(&self, what: &str) -> Result<&'a [T]> {
        match self.rows.checked_mul(self.cols) {
            Some(n) if n == self.data.len() => Ok(self.data),
            _ => Err(Error::invalid(format!(
                "{what} claims {} x {} values but holds {}",
                self.rows,
                self.cols,
                self.data.len()
            ))),
        }
    }
}
