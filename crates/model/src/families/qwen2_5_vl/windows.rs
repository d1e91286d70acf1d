//! Qwen2.5-VL's attention windows: each image's merged tokens are cut into squares of
//! `window` x `window` tokens (the last row and column of windows may be partial), and the
//! tower processes tokens window by window.

/// The order in which the tower visits merged tokens, and the windows in that order.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct Windows {
    /// `order[i]`: the merged token (in the processor's order, over all images) at position `i`.
    pub order: Vec<usize>,
    /// `(first token, tokens)` of each non-empty window, in the new order.
    pub spans: Vec<(usize, usize)>,
}

impl Windows {
    /// `grids` in patches; `merge`: patches per side of a merged token; `window`: merged tokens
    /// per side of a window.
    pub fn new(grids: &[[usize; 3]], merge: usize, window: usize) -> Self {
        let mut order = Vec::new();
        let mut spans = Vec::new();
        let mut offset = 0;
        for &[t, h, w] in grids {
            let (rows, cols) = (h / merge, w / merge);
            // transformers pads to whole windows (a full extra window when already whole, which
            // stays empty) and drops the padding.
            let (windows_down, windows_across) = (rows / window + 1, cols / window + 1);
            for frame in 0..t {
                for wy in 0..windows_down {
                    for wx in 0..windows_across {
                        let start = order.len();
                        for y in wy * window..((wy + 1) * window).min(rows) {
                            for x in wx * window..((wx + 1) * window).min(cols) {
                                order.push(offset + frame * rows * cols + y * cols + x);
                            }
                        }
                        if order.len() > start {
                            spans.push((start, order.len() - start));
                        }
                    }
                }
            }
            offset += t * rows * cols;
        }
        Self { order, spans }
    }

    /// The inverse permutation: where each merged token of the processor's order went.
    pub fn inverse(&self) -> Vec<usize> {
        let mut inverse = vec![0; self.order.len()];
        for (position, &token) in self.order.iter().enumerate() {
            inverse[token] = position;
        }
        inverse
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_grid_is_cut_into_whole_and_partial_windows() {
        // 3 x 5 merged tokens (6 x 10 patches), windows of 2: rows [0,1] [2], columns [0,1] [2,3] [4].
        let w = Windows::new(&[[1, 6, 10]], 2, 2);
        assert_eq!(w.spans, vec![(0, 4), (4, 4), (8, 2), (10, 2), (12, 2), (14, 1)]);
        assert_eq!(&w.order[..4], &[0, 1, 5, 6]);
        assert_eq!(&w.order[8..10], &[4, 9]);
        assert_eq!(w.order[14], 14);
        let inverse = w.inverse();
        assert!(w.order.iter().enumerate().all(|(i, &t)| inverse[t] == i));
    }

    #[test]
    fn whole_windows_and_several_images_keep_images_apart() {
        // 2 x 2 merged tokens in one window, then a 1 x 1 image.
        let w = Windows::new(&[[1, 4, 4], [1, 2, 2]], 2, 2);
        assert_eq!(w.order, vec![0, 1, 2, 3, 4]);
        assert_eq!(w.spans, vec![(0, 4), (4, 1)]);
    }
}
