//! Untrusted PDFs as the renderer's child process reads them: the checks that refuse a document
//! (header, truncation, password, page count), page selection, and each of the first pages
//! rendered within a small pixel budget. Must end in pixels, a typed refusal or a page error,
//! within libFuzzer's time and memory limits. (The server adds its own bounds around this code:
//! a child process with an address-space limit, killed past `pdf_page_timeout_secs`.)
//!
//! Input: one byte choosing the pixel budget, then the document.
#![no_main]

use libfuzzer_sys::fuzz_target;
use qwen_ocr_server::documents::pages::PageSelection;
use qwen_ocr_server::documents::pdf::Document;

/// Rendering every page of a long document would only repeat the work; the first few show it.
const PAGES: u32 = 3;

fuzz_target!(|data: &[u8]| {
    let [budget, pdf @ ..] = data else { return };
    // 784 (one merged patch) to 100352 pixels.
    let max_pixels = 784u64 << (budget % 8);
    let Ok(document) = Document::open(pdf.to_vec()) else { return };
    let count = document.page_count();
    assert!(count > 0, "an opened document has pages");
    let first = format!("1-{}", count.min(PAGES)).parse::<PageSelection>().expect("a valid selection");
    let pages = document.select(Some(&first), PAGES as usize).expect("the first pages exist");
    for page in pages {
        let Ok(rendered) = document.render(page, max_pixels) else { continue };
        let (width, height) = rendered.image.dimensions();
        // Within the budget, give or take the rounding of each side.
        assert!(u64::from(width) * u64::from(height) <= max_pixels + u64::from(width + height) + 1, "{width}x{height} > {max_pixels}");
        assert!(rendered.dpi.is_finite() && rendered.dpi > 0.0, "dpi {}", rendered.dpi);
    }
});
