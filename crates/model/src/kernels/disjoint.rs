//! A buffer that parallel tasks fill in parts no two of them share, e.g. the attention
//! kernels' per-head layouts, written chunk of rows by chunk of rows so that each chunk's rows
//! are read from memory once for every head.

use std::marker::PhantomData;
use std::ops::Range;

pub(crate) struct Disjoint<'a, T> {
    ptr: *mut T,
    len: usize,
    _buf: PhantomData<&'a mut [T]>,
}

impl<'a, T> Disjoint<'a, T> {
    pub(crate) fn new(buf: &'a mut [T]) -> Self {
        Disjoint { ptr: buf.as_mut_ptr(), len: buf.len(), _buf: PhantomData }
    }

    /// Elements `range` of the buffer.
    ///
    /// # Safety
    /// No other live slice from this buffer overlaps `range`.
    #[allow(clippy::mut_from_ref)] // the point of the type; the contract above is what makes it sound
    pub(crate) unsafe fn part(&self, range: Range<usize>) -> &mut [T] {
        assert!(range.start <= range.end && range.end <= self.len, "Disjoint::part: {range:?} outside {}", self.len);
        // SAFETY: inside the buffer (asserted), which `'a` keeps borrowed; exclusive by the
        // caller's contract.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.add(range.start), range.len()) }
    }
}

// SAFETY: the buffer is only reached through `part`, whose callers never share an element;
// sending or sharing the handle is then sending `&mut` parts of a `Send` buffer.
unsafe impl<T: Send> Send for Disjoint<'_, T> {}
unsafe impl<T: Send> Sync for Disjoint<'_, T> {}
