//! M-RoPE position ids: text tokens advance one index on all three rows; an image's tokens take
//! `(t, row, col)` of its merged grid offset by where the image starts; text after an image
//! continues from the largest position so far plus one.

use crate::config::TokenIds;
use crate::error::{Error, Result};

/// Positions of a prompt, and the offset that decoding adds to the cache length afterwards.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PromptPositions {
    pub positions: Vec<[u32; 3]>,
    /// `max position + 1 - prompt length`: position of the token at cache length `L` is `L + delta`.
    pub delta: i64,
}

/// `grids` are each image's `(t, h, w)` in patches, in prompt order; each image occupies
/// `t * h * w / merge^2` consecutive image tokens.
pub fn prompt_positions(ids: &[u32], grids: &[[usize; 3]], tokens: &TokenIds, merge: usize) -> Result<PromptPositions> {
    let mut positions = Vec::with_capacity(ids.len());
    let mut next = 0u32;
    let mut images = grids.iter();
    let mut i = 0;
    while i < ids.len() {
        if ids[i] != tokens.image {
            positions.push([next; 3]);
            next += 1;
            i += 1;
            continue;
        }
        let &[t, h, w] = images.next().ok_or_else(|| Error::InvalidRequest("more image placeholders than images".into()))?;
        let (gh, gw) = (h / merge, w / merge);
        let count = t * gh * gw;
        if ids.len() < i + count || ids[i..i + count].iter().any(|&id| id != tokens.image) {
            return Err(Error::InvalidRequest("image placeholder count does not match the image grid".into()));
        }
        for ti in 0..t as u32 {
            for hi in 0..gh as u32 {
                for wi in 0..gw as u32 {
                    positions.push([next + ti, next + hi, next + wi]);
                }
            }
        }
        next += gh.max(gw) as u32;
        i += count;
    }
    if images.next().is_some() {
        return Err(Error::InvalidRequest("more images than image placeholders".into()));
    }
    let max = positions.iter().flat_map(|p| p.iter().copied()).max().map_or(0, |m| m as i64 + 1);
    Ok(PromptPositions { delta: max - ids.len() as i64, positions })
}

/// The position of the token that will sit at cache index `cache_len` during decoding.
pub fn decode_position(cache_len: usize, delta: i64) -> [u32; 3] {
    [(cache_len as i64 + delta) as u32; 3]
}

#[cfg(test)]
mod tests {
    use super::*;

    const TOKENS: TokenIds = TokenIds { image: 9, video: 10, vision_start: 7, vision_end: 8 };

    #[test]
    fn text_only_positions_count_up_with_zero_delta() {
        let p = prompt_positions(&[1, 2, 3], &[], &TOKENS, 2).unwrap();
        assert_eq!(p.positions, vec![[0; 3], [1; 3], [2; 3]]);
        assert_eq!(p.delta, 0);
    }

    #[test]
    fn image_tokens_take_grid_positions_and_text_resumes_after_the_largest() {
        // grid 1 x 4 x 6 patches -> 2 x 3 merged tokens
        let ids = [1, 7, 9, 9, 9, 9, 9, 9, 8, 2];
        let p = prompt_positions(&ids, &[[1, 4, 6]], &TOKENS, 2).unwrap();
        assert_eq!(&p.positions[..2], &[[0; 3], [1; 3]]);
        assert_eq!(&p.positions[2..8], &[[2, 2, 2], [2, 2, 3], [2, 2, 4], [2, 3, 2], [2, 3, 3], [2, 3, 4]]);
        assert_eq!(&p.positions[8..], &[[5; 3], [6; 3]]);
        assert_eq!(p.delta, 7 - 10);
        assert_eq!(decode_position(10, p.delta), [7; 3]);
    }

    #[test]
    fn mismatched_images_are_rejected() {
        assert!(prompt_positions(&[9, 9], &[], &TOKENS, 2).is_err());
        assert!(prompt_positions(&[1], &[[1, 2, 2]], &TOKENS, 2).is_err());
        assert!(prompt_positions(&[9, 9], &[[1, 2, 2]], &TOKENS, 2).is_err());
    }
}
