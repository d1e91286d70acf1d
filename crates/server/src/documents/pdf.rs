//! PDF documents in this process: the checks that refuse a document as a whole, and one page
//! rendered to RGB within a pixel budget. The input is untrusted and the renderer has no time
//! or memory bound of its own, so the server runs this only inside the child process of
//! [`super::isolated`]; the fuzz target calls it directly.

use std::collections::HashMap;
use std::rc::Rc;

use hayro::hayro_interpret::InterpreterSettings;
use hayro::hayro_syntax::content::ops::TypedInstruction;
use hayro::hayro_syntax::content::TypedIter;
use hayro::hayro_syntax::object::{Array, Dict, Name, Object, ObjectIdentifier, Stream};
use hayro::hayro_syntax::page::{Page, Resources};
use hayro::hayro_syntax::{DecryptionError, LoadPdfError, Pdf};
use hayro::vello_cpu::color::palette::css::WHITE;
use hayro::{PixmapSettings, RenderCache, RenderSettings};
use image::RgbImage;
use serde::{Deserialize, Serialize};

use super::pages::PageSelection;

/// Readers accept the `%PDF-` header anywhere in the first 1024 bytes, and so do we.
const HEADER_WINDOW: usize = 1024;
/// Where `startxref` and `%%EOF` must be: the end of an untruncated file.
const TRAILER_WINDOW: usize = 1024;
/// The renderer's canvas has 16-bit sides.
const MAX_SIDE: f64 = u16::MAX as f64;
/// The most a side may exceed the other: `smart_resize` refuses more.
const MAX_ASPECT_RATIO: f64 = 200.0;

/// Why a document is refused as a whole, before any page reaches the model.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[serde(tag = "reason", content = "detail", rename_all = "snake_case")]
pub enum DocumentError {
    #[error("not a PDF: {0}")]
    NotPdf(String),
    /// Cut off before its end; refused even where the renderer could repair it, because the
    /// pages it would show are not the document that was sent.
    #[error("the PDF is truncated: {0}")]
    Truncated(String),
    /// Encrypted with a user password (an empty one opens the document, and is no password).
    #[error("the PDF needs a password to open; send it decrypted")]
    NeedsPassword,
    #[error("the PDF has no pages")]
    NoPages,
    #[error("{0}")]
    PagesOutsideDocument(String),
    #[error("{selected} pages selected, the limit is {limit} per request (max_pdf_pages): choose some with `pages`")]
    TooManyPages { selected: usize, limit: usize },
    #[error("the PDF cannot be read: {0}")]
    Unreadable(String),
}

/// Whether `bytes` start like a PDF (its header within the first 1024 bytes).
pub fn is_pdf(bytes: &[u8]) -> bool {
    find(&bytes[..bytes.len().min(HEADER_WINDOW)], b"%PDF-").is_some()
}

/// One page rendered: its pixels, upright (the page's `/Rotate` applied), and the resolution
/// they were drawn at.
pub struct RenderedPage {
    pub image: RgbImage,
    /// Pixels per inch: the page's points times `dpi / 72` are its pixels.
    pub dpi: f64,
}

/// An opened, checked document.
pub struct Document {
    pdf: Pdf,
}

impl Document {
    /// Parses the document and refuses it when it is not a PDF, is cut off, needs a password or
    /// has no pages.
    pub fn open(bytes: Vec<u8>) -> Result<Self, DocumentError> {
        if !is_pdf(&bytes) {
            return Err(DocumentError::NotPdf("no %PDF- header in its first 1024 bytes".into()));
        }
        check_complete(&bytes)?;
        let pdf = Pdf::new(bytes).map_err(|e| match e {
            LoadPdfError::Decryption(DecryptionError::PasswordProtected) => DocumentError::NeedsPassword,
            LoadPdfError::Decryption(DecryptionError::UnsupportedAlgorithm) => {
                DocumentError::Unreadable("it is encrypted with an algorithm the renderer does not support".into())
            }
            LoadPdfError::Decryption(other) => DocumentError::Unreadable(format!("its encryption is broken ({other:?})")),
            LoadPdfError::Invalid => DocumentError::Unreadable("no page tree or cross-reference table could be found".into()),
        })?;
        let found = pdf.pages().len();
        if let Some(declared) = declared_page_count(&pdf) {
            if declared as usize > found {
                return Err(DocumentError::Truncated(format!("its page tree declares {declared} pages, only {found} are in the file")));
            }
        }
        if found == 0 {
            return Err(DocumentError::NoPages);
        }
        Ok(Self { pdf })
    }

    pub fn page_count(&self) -> u32 {
        self.pdf.pages().len() as u32
    }

    /// The page numbers a request reads: its selection (all pages without one), at most
    /// `max_pages` of them.
    pub fn select(&self, selection: Option<&PageSelection>, max_pages: usize) -> Result<Vec<u32>, DocumentError> {
        let count = self.page_count();
        let pages = match selection {
            Some(selection) => selection.resolve(count).map_err(DocumentError::PagesOutsideDocument)?,
            None => (1..=count).collect(),
        };
        if pages.len() > max_pages {
            return Err(DocumentError::TooManyPages { selected: pages.len(), limit: max_pages });
        }
        Ok(pages)
    }

    /// Renders page `number` (from 1) on white at the resolution that fills `max_pixels`.
    pub fn render(&self, number: u32, max_pixels: u64) -> Result<RenderedPage, String> {
        let pages = self.pdf.pages();
        let page = number.checked_sub(1).and_then(|i| pages.get(i as usize)).ok_or_else(|| format!("there is no page {number}"))?;
        let (width, height) = page.render_dimensions();
        let scale = render_scale(width as f64, height as f64, max_pixels)?;
        FormDraws::default().count_page(page)?;
        let pixmap_settings = PixmapSettings { x_scale: scale as f32, y_scale: scale as f32, bg_color: WHITE };
        let cache = RenderCache::new();
        let pixmap = hayro::render(page, &cache, &InterpreterSettings::default(), &RenderSettings::default(), &pixmap_settings);
        let (w, h) = (u32::from(pixmap.width()), u32::from(pixmap.height()));
        if w == 0 || h == 0 {
            return Err(format!("the page ({width} x {height} points) renders to no pixels"));
        }
        // Drawn over an opaque background, every pixel is opaque: premultiplied RGBA is RGBA.
        let rgb = pixmap.data_as_u8_slice().chunks_exact(4).flat_map(|p| [p[0], p[1], p[2]]).collect();
        let image = RgbImage::from_raw(w, h, rgb).ok_or("the renderer returned a short pixel buffer")?;
        Ok(RenderedPage { image, dpi: 72.0 * scale })
    }
}

/// Pixels per point at which a `width` x `height` point page has `max_pixels` pixels (each
/// side within the canvas).
fn render_scale(width: f64, height: f64, max_pixels: u64) -> Result<f64, String> {
    let ratio = width.max(height) / width.min(height);
    if ratio.is_nan() || ratio > MAX_ASPECT_RATIO {
        return Err(format!("the page is {width} x {height} points: more than {MAX_ASPECT_RATIO} times longer than wide"));
    }
    let scale = (max_pixels as f64 / (width * height)).sqrt();
    Ok(scale.min(MAX_SIDE / width.max(height)))
}

/// Form XObjects a page may draw, counted through their nesting (a form drawn twice that draws
/// another twice costs 2 + 4 draws). Forms drawing forms multiply: 50 levels of two, within the
/// renderer's own nesting limit, would never finish. A page past this is refused before
/// drawing, instead of costing `pdf_page_timeout_secs`.
const MAX_FORM_DRAWS: u64 = 100_000;
/// The renderer's nesting limit (hayro's `MAX_NESTED_INTERPRETATION_DEPTH`): deeper forms are
/// not drawn, so they cost nothing.
const MAX_NESTING: u32 = 50;

/// Counts the form draws of a page: its content and its annotations' appearances, each form's
/// own `Do`s read once.
#[derive(Default)]
struct FormDraws {
    draws: u64,
    /// The `Do` names of each form's content, by object.
    names: HashMap<ObjectIdentifier, Rc<Vec<Vec<u8>>>>,
}

impl FormDraws {
    fn count_page(&mut self, page: &Page<'_>) -> Result<(), String> {
        let names = page.page_stream().map(xobject_names).unwrap_or_default();
        self.count(&names, page.resources(), 0)?;
        let annotations = page.raw().get::<Array<'_>>(b"Annots");
        for annotation in annotations.iter().flat_map(|a| a.iter::<Dict<'_>>()) {
            if let Some(appearance) = appearance(&annotation) {
                self.count_form(&appearance, page.resources(), 1)?;
            }
        }
        Ok(())
    }

    fn count<'a>(&mut self, names: &[Vec<u8>], resources: &Resources<'a>, depth: u32) -> Result<(), String> {
        for name in names {
            if let Some(form) = resources.x_objects.get::<Stream<'a>>(name.as_slice()) {
                self.count_form(&form, resources, depth + 1)?;
            }
        }
        Ok(())
    }

    fn count_form<'a>(&mut self, stream: &Stream<'a>, resources: &Resources<'a>, depth: u32) -> Result<(), String> {
        if depth > MAX_NESTING || stream.dict().get::<Name<'_>>(b"Subtype").as_deref() != Some(b"Form".as_slice()) {
            return Ok(());
        }
        self.draws += 1;
        if self.draws > MAX_FORM_DRAWS {
            return Err(format!("the page draws more than {MAX_FORM_DRAWS} forms through forms that draw forms: refused before drawing"));
        }
        let names = match self.names.get(&stream.obj_id()) {
            Some(names) => names.clone(),
            None => {
                let names = Rc::new(stream.decoded().map(|content| xobject_names(&content)).unwrap_or_default());
                self.names.insert(stream.obj_id(), names.clone());
                names
            }
        };
        // A form without resources of its own uses the ones it is drawn with.
        let own = stream.dict().get::<Dict<'a>>(b"Resources").map(Resources::new);
        self.count(&names, own.as_ref().unwrap_or(resources), depth)
    }
}

/// The names a content stream draws with `Do`.
fn xobject_names(content: &[u8]) -> Vec<Vec<u8>> {
    let mut ops = TypedIter::new(content);
    let mut names = Vec::new();
    while let Some(op) = ops.next() {
        if let TypedInstruction::XObject(x) = op {
            names.push(x.0.to_vec());
        }
    }
    names
}

/// An annotation's normal appearance, as the renderer picks it.
fn appearance<'a>(annotation: &Dict<'a>) -> Option<Stream<'a>> {
    match annotation.get::<Dict<'a>>(b"AP")?.get::<Object<'a>>(b"N")? {
        Object::Stream(stream) => Some(stream),
        Object::Dict(states) => annotation
            .get::<Name<'_>>(b"AS")
            .and_then(|state| states.get::<Stream<'a>>(&*state))
            .or_else(|| states.get::<Stream<'a>>(b"Off")),
        _ => None,
    }
}

/// A complete file ends with `startxref`, the offset of its cross-reference section, and
/// `%%EOF`. A transfer cut short loses them.
fn check_complete(bytes: &[u8]) -> Result<(), DocumentError> {
    let tail = &bytes[bytes.len().saturating_sub(TRAILER_WINDOW)..];
    let truncated = |why: &str| DocumentError::Truncated(why.into());
    let eof = rfind(tail, b"%%EOF").ok_or_else(|| truncated("it does not end with %%EOF"))?;
    let start = rfind(&tail[..eof], b"startxref").ok_or_else(|| truncated("no startxref before its %%EOF"))?;
    let offset = std::str::from_utf8(&tail[start + b"startxref".len()..eof])
        .ok()
        .and_then(|text| text.trim().parse::<u64>().ok())
        .ok_or_else(|| truncated("its startxref has no offset"))?;
    if offset >= bytes.len() as u64 {
        return Err(truncated("its startxref points past its end"));
    }
    Ok(())
}

/// The page tree's `/Count`, when the catalog has a page tree that says.
fn declared_page_count(pdf: &Pdf) -> Option<u32> {
    let catalog = pdf.xref().get::<Dict<'_>>(pdf.xref().root_id())?;
    catalog.get::<Dict<'_>>(b"Pages")?.get::<u32>(b"Count")
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

fn rfind(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).rposition(|w| w == needle)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_scale_fills_the_budget_within_the_canvas() {
        // US Letter into 1 Mpx: 612 x 792 points at ~1.43 px/pt (~103 dpi).
        let s = render_scale(612.0, 792.0, 1_000_000).unwrap();
        let (w, h) = ((612.0 * s).floor(), (792.0 * s).floor());
        assert!(w * h <= 1e6 && w * h > 0.99e6, "{w} x {h}");
        // A long strip keeps its sides within the 16-bit canvas.
        let s = render_scale(14_400.0, 100.0, 12_845_056).unwrap();
        assert!(14_400.0 * s <= MAX_SIDE);
        assert!(render_scale(20_100.0, 100.0, 1 << 20).unwrap_err().contains("200 times"));
    }

    #[test]
    fn a_file_without_its_trailer_is_truncated() {
        let complete = b"%PDF-1.7\n1 0 obj\n<<>>\nendobj\nxref\n0 1\n0000000000 65535 f \ntrailer\n<<>>\nstartxref\n29\n%%EOF\n";
        check_complete(complete).unwrap();
        for cut in [complete.len() - 3, complete.len() - 12, 40] {
            let err = check_complete(&complete[..cut]).unwrap_err();
            assert!(matches!(err, DocumentError::Truncated(_)), "{cut}: {err}");
        }
        let past_the_end = String::from_utf8_lossy(complete).replace("startxref\n29", "startxref\n999");
        assert!(check_complete(past_the_end.as_bytes()).unwrap_err().to_string().contains("past its end"));
    }

    #[test]
    fn the_header_may_come_after_some_junk() {
        assert!(is_pdf(b"\xef\xbb\xbf%PDF-1.4\n"));
        assert!(!is_pdf(b"\x89PNG\r\n\x1a\n"));
        assert!(matches!(Document::open(b"GIF89a".to_vec()), Err(DocumentError::NotPdf(_))));
    }
}
