//! The one case where PIL's `convert("RGB")` still leaves a transparency behind: a PNG whose
//! transparency is a single colour (a palette with one fully transparent entry, or an RGB or
//! grayscale colour key). PIL then keeps that colour as `info["transparency"]`, and
//! transformers' `convert_to_rgb` turns every pixel of that colour white. Alpha channels
//! (RGBA, LA, palettes with partial transparency) are dropped with no such trace.

use std::io::Cursor;

/// The colour that transformers will paint white after `convert("RGB")`, if any.
pub fn png_color_key(bytes: &[u8]) -> Option<[u8; 3]> {
    let reader = png::Decoder::new(Cursor::new(bytes)).read_info().ok()?;
    let info = reader.info();
    let trns = info.trns.as_deref()?;
    let eight_bit = info.bit_depth == png::BitDepth::Eight;
    match info.color_type {
        // PIL keeps an index only when exactly one entry is transparent and the rest opaque.
        png::ColorType::Indexed => {
            let index = trns.iter().position(|&a| a == 0)?;
            let simple = trns.iter().enumerate().all(|(i, &a)| a == 255 || i == index);
            let palette = info.palette.as_deref()?;
            simple.then(|| palette.get(index * 3..index * 3 + 3).map(|c| [c[0], c[1], c[2]]))?
        }
        // 16-bit samples; an 8-bit image's value is the low byte.
        png::ColorType::Rgb if eight_bit && trns.len() >= 6 => Some([trns[1], trns[3], trns[5]]),
        png::ColorType::Grayscale if eight_bit && trns.len() >= 2 => Some([trns[1]; 3]),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_palette_with_one_transparent_entry_keys_that_entrys_colour() {
        let bytes = std::fs::read(concat!(env!("CARGO_MANIFEST_DIR"), "/../../tests/fixtures/images/palette.png")).unwrap();
        assert_eq!(png_color_key(&bytes), Some([250, 241, 28]));
        let rgba = std::fs::read(concat!(env!("CARGO_MANIFEST_DIR"), "/../../tests/fixtures/images/rgba.png")).unwrap();
        assert_eq!(png_color_key(&rgba), None);
    }
}
