//! Qwen3-VL's learned position embeddings: a square grid of embeddings, interpolated
//! bilinearly to each image's patch grid (transformers' `fast_pos_embed_interpolate`, same
//! f32 arithmetic), in the processor's merge-group order.

use crate::families::shared::merge_order;

/// `steps` points from `start` to `end` as `torch.linspace` computes them in f32: the first
/// half counted up from `start`, the second half down from `end`.
fn linspace(start: f32, end: f32, steps: usize) -> Vec<f32> {
    if steps == 1 {
        return vec![start];
    }
    let step = (end - start) / (steps - 1) as f32;
    (0..steps).map(|i| if i < steps / 2 { start + step * i as f32 } else { end - step * (steps - 1 - i) as f32 }).collect()
}

/// One grid axis: for each of `n` patches, the two neighbouring table rows (or columns) and the
/// weight of the second.
fn axis(grid: usize, n: usize) -> Vec<(usize, usize, f32)> {
    linspace(0.0, (grid - 1) as f32, n)
        .into_iter()
        .map(|p| {
            let floor = p as usize;
            (floor, (floor + 1).min(grid - 1), p - floor as f32)
        })
        .collect()
}

/// The interpolated embeddings `[t * h * w, width]` of one image, row-major, from `table`
/// (`[grid * grid, width]`).
pub(crate) fn interpolate(table: &[f32], width: usize, grid: usize, [t, h, w]: [usize; 3], merge: usize) -> Vec<f32> {
    let (rows, cols) = (axis(grid, h), axis(grid, w));
    let at = |r: usize, c: usize| &table[(r * grid + c) * width..][..width];
    let mut frame = Vec::with_capacity(h * w * width);
    for (row, col) in merge_order(h, w, merge) {
        let (r0, r1, dh) = rows[row];
        let (c0, c1, dw) = cols[col];
        let weights = [(1.0 - dh) * (1.0 - dw), (1.0 - dh) * dw, dh * (1.0 - dw), dh * dw];
        let corners = [at(r0, c0), at(r0, c1), at(r1, c0), at(r1, c1)];
        frame.extend((0..width).map(|i| {
            let terms: Vec<f32> = corners.iter().zip(weights).map(|(c, wt)| c[i] * wt).collect();
            ((terms[0] + terms[1]) + terms[2]) + terms[3]
        }));
    }
    frame.repeat(t)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn linspace_counts_from_both_ends() {
        assert_eq!(linspace(0.0, 3.0, 4), vec![0.0, 1.0, 2.0, 3.0]);
        assert_eq!(linspace(0.0, 5.0, 1), vec![0.0]);
        let l = linspace(0.0, 47.0, 7);
        assert_eq!((l[0], l[6]), (0.0, 47.0));
    }

    #[test]
    fn a_grid_the_size_of_the_table_reads_the_table() {
        // 2 x 2 table of width 1, image of 2 x 2 patches, merge 1: exactly the table.
        let table = [1.0, 2.0, 3.0, 4.0];
        assert_eq!(interpolate(&table, 1, 2, [1, 2, 2], 1), vec![1.0, 2.0, 3.0, 4.0]);
        // 3 x 3 patches: the centre is the mean of all four.
        let out = interpolate(&table, 1, 2, [1, 3, 3], 1);
        assert_eq!(out[4], 2.5);
    }
}
