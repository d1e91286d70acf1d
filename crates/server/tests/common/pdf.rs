//! PDFs for the tests and benchmarks, written with pdf-writer: US Letter pages of vector text
//! (Helvetica, one of the standard fonts every reader has) with an embedded RGB image, and the
//! broken, locked and hostile variants the server must refuse or contain.

use std::io::Write;

use pdf_writer::{Content, Filter, Finish, Name, Pdf, Rect, Ref, Str};

const CATALOG: Ref = Ref::new(1);
const TREE: Ref = Ref::new(2);
const FONT: Ref = Ref::new(3);
const IMAGE: Ref = Ref::new(4);
const ENCRYPT: Ref = Ref::new(5);
/// Page `i` (from 0) is object `FIRST_PAGE + 2i`, its content stream the object after it.
const FIRST_PAGE: i32 = 10;
/// Points: US Letter.
pub const PAGE_SIZE: (f32, f32) = (612.0, 792.0);

/// What a page holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PageKind {
    /// A title, a line of fields and the image.
    Invoice,
    /// A form that draws a form ... `depth` levels deep, each level `fanout` times:
    /// `fanout^depth` full-page fills from a few hundred bytes.
    FanOut { depth: u32, fanout: u32 },
    /// A content stream that inflates to this many MiB of spaces, which the renderer holds
    /// whole.
    Inflating { megabytes: usize },
    /// This many full-page fills, one after the other (compressed: a few hundred kilobytes).
    Fills { count: usize },
}

/// A document of `pages` invoice pages.
pub fn document(pages: u32) -> Vec<u8> {
    with_pages(&vec![PageKind::Invoice; pages as usize])
}

/// A document with these pages.
pub fn with_pages(kinds: &[PageKind]) -> Vec<u8> {
    write(kinds, kinds.len() as u32, None, |_, content| content)
}

/// A document whose page tree declares `declared` pages but holds `pages`: what a file cut off
/// (and then repaired) looks like.
pub fn declaring(pages: u32, declared: u32) -> Vec<u8> {
    write(&vec![PageKind::Invoice; pages as usize], declared, None, |_, content| content)
}

/// A document with no pages at all.
pub fn no_pages() -> Vec<u8> {
    write(&[], 0, None, |_, content| content)
}

/// A one-page document encrypted (RC4, 40 bits: the standard security handler, revision 2)
/// with this user password; an empty one opens it without asking.
pub fn encrypted(user_password: &str) -> Vec<u8> {
    let security = Security::new(user_password);
    let bytes = write(&[PageKind::Invoice], 1, Some(&security), |id, content| rc4(&security.object_key(id), &content));
    // pdf-writer's trailer has no /Encrypt entry: add it (the trailer follows the
    // cross-reference table, so no offset moves).
    let at = find(&bytes, b"trailer\n<<").expect("a trailer") + b"trailer\n<<".len();
    [&bytes[..at], format!("\n  /Encrypt {} 0 R", ENCRYPT.get()).as_bytes(), &bytes[at..]].concat()
}

/// The document; `seal` turns each stream's plain bytes (with its object id) into what is
/// stored.
fn write(kinds: &[PageKind], declared: u32, security: Option<&Security>, seal: impl Fn(Ref, Vec<u8>) -> Vec<u8>) -> Vec<u8> {
    let mut pdf = Pdf::new();
    let pages = kinds.len();
    let page_ids: Vec<Ref> = (0..pages).map(|i| Ref::new(FIRST_PAGE + 2 * i as i32)).collect();
    pdf.catalog(CATALOG).pages(TREE);
    pdf.pages(TREE).kids(page_ids.iter().copied()).count(declared as i32);
    pdf.type1_font(FONT).base_font(Name(b"Helvetica"));
    let image = seal(IMAGE, gradient(64, 48));
    let mut xobject = pdf.image_xobject(IMAGE, &image);
    xobject.width(64).height(48).bits_per_component(8).color_space().device_rgb();
    xobject.finish();
    for (i, (&id, &kind)) in page_ids.iter().zip(kinds).enumerate() {
        let content_id = Ref::new(id.get() + 1);
        // After the pages' objects, 16 levels each: few free ids, a short xref table.
        let form = |level: u32| Ref::new(FIRST_PAGE + 2 * pages as i32 + 16 * i as i32 + level as i32);
        let mut page = pdf.page(id);
        page.media_box(Rect::new(0.0, 0.0, PAGE_SIZE.0, PAGE_SIZE.1)).parent(TREE).contents(content_id);
        let mut resources = page.resources();
        resources.fonts().pair(Name(b"F1"), FONT);
        let mut xobjects = resources.x_objects();
        xobjects.pair(Name(b"Im1"), IMAGE);
        if matches!(kind, PageKind::FanOut { .. }) {
            xobjects.pair(Name(b"F"), form(0));
        }
        xobjects.finish();
        resources.finish();
        page.finish();
        match kind {
            PageKind::Invoice => {
                let mut content = Content::new();
                content.begin_text().set_font(Name(b"F1"), 28.0).next_line(72.0, 700.0);
                content.show(Str(format!("Invoice {} of {pages}", i + 1).as_bytes())).end_text();
                content.begin_text().set_font(Name(b"F1"), 16.0).next_line(72.0, 650.0);
                content.show(Str(format!("Number: INV-{:05}   Total: {}.50 EUR", 1000 + i, 10 * (i + 1)).as_bytes())).end_text();
                content.save_state().transform([240.0, 0.0, 0.0, 180.0, 72.0, 400.0]).x_object(Name(b"Im1")).restore_state();
                let content = seal(content_id, content.finish().to_vec());
                pdf.stream(content_id, &content);
            }
            PageKind::FanOut { depth, fanout } => {
                let draw_next = |content: &mut Content| {
                    for _ in 0..fanout {
                        content.x_object(Name(b"F"));
                    }
                };
                for level in 0..depth {
                    let mut content = Content::new();
                    if level + 1 == depth {
                        content.set_fill_rgb(0.2, 0.4, 0.6).rect(0.0, 0.0, PAGE_SIZE.0, PAGE_SIZE.1).fill_nonzero();
                    } else {
                        draw_next(&mut content);
                    }
                    let content = seal(form(level), content.finish().to_vec());
                    let mut xobject = pdf.form_xobject(form(level), &content);
                    xobject.bbox(Rect::new(0.0, 0.0, PAGE_SIZE.0, PAGE_SIZE.1));
                    if level + 1 < depth {
                        xobject.resources().x_objects().pair(Name(b"F"), form(level + 1));
                    }
                    xobject.finish();
                }
                let mut content = Content::new();
                draw_next(&mut content);
                let content = seal(content_id, content.finish().to_vec());
                pdf.stream(content_id, &content);
            }
            PageKind::Inflating { megabytes } => {
                let spaces = vec![b' '; 1 << 20];
                let content = seal(content_id, deflate(std::iter::repeat_n(&spaces[..], megabytes)));
                pdf.stream(content_id, &content).filter(Filter::FlateDecode);
            }
            PageKind::Fills { count } => {
                let fill = format!("0 0 {} {} re f\n", PAGE_SIZE.0, PAGE_SIZE.1).repeat(10_000);
                let content = seal(content_id, deflate(std::iter::repeat_n(fill.as_bytes(), count / 10_000)));
                pdf.stream(content_id, &content).filter(Filter::FlateDecode);
            }
        }
    }
    if let Some(security) = security {
        pdf.set_file_id((security.id.to_vec(), security.id.to_vec()));
        let mut dict = pdf.indirect(ENCRYPT).dict();
        dict.pair(Name(b"Filter"), Name(b"Standard")).pair(Name(b"V"), 1).pair(Name(b"R"), 2).pair(Name(b"P"), security.permissions);
        dict.pair(Name(b"O"), Str(&security.owner)).pair(Name(b"U"), Str(&security.user));
        dict.finish();
    }
    pdf.finish()
}

/// zlib (`FlateDecode`) of the chunks one after the other.
fn deflate<'a>(chunks: impl Iterator<Item = &'a [u8]>) -> Vec<u8> {
    let mut encoder = flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::fast());
    for chunk in chunks {
        encoder.write_all(chunk).unwrap();
    }
    encoder.finish().unwrap()
}

/// A smooth RGB gradient, `width` x `height`.
fn gradient(width: u32, height: u32) -> Vec<u8> {
    (0..height).flat_map(|y| (0..width).flat_map(move |x| [(x * 255 / width) as u8, (y * 255 / height) as u8, 128])).collect()
}

/// The standard security handler, revision 2 (PDF 1.7, 7.6.3): a 40-bit RC4 key from the
/// padded user password, the `/O` entry, the permissions and the file id.
struct Security {
    key: Vec<u8>,
    owner: [u8; 32],
    user: Vec<u8>,
    permissions: i32,
    id: [u8; 16],
}

const PADDING: [u8; 32] = [
    0x28, 0xBF, 0x4E, 0x5E, 0x4E, 0x75, 0x8A, 0x41, 0x64, 0x00, 0x4E, 0x56, 0xFF, 0xFA, 0x01, 0x08, 0x2E, 0x2E, 0x00, 0xB6, 0xD0, 0x68,
    0x3E, 0x80, 0x2F, 0x0C, 0xA9, 0xFE, 0x64, 0x53, 0x69, 0x7A,
];

impl Security {
    fn new(user_password: &str) -> Self {
        // The owner entry only has to be 32 bytes that go into the key: no owner password
        // opens this file, which is all the tests need.
        let owner: [u8; 32] = std::array::from_fn(|i| (i as u8).wrapping_mul(37).wrapping_add(11));
        let id: [u8; 16] = std::array::from_fn(|i| (i as u8).wrapping_mul(91).wrapping_add(3));
        let permissions: i32 = -4;
        let padded: Vec<u8> = user_password.bytes().chain(PADDING).take(32).collect();
        let digest = md5::compute([&padded[..], &owner, &permissions.to_le_bytes(), &id].concat());
        let key = digest.0[..5].to_vec();
        let user = rc4(&key, &PADDING);
        Self { key, owner, user, permissions, id }
    }

    /// The key of one object's strings and streams (algorithm 1).
    fn object_key(&self, id: Ref) -> Vec<u8> {
        let n = id.get() as u32;
        let salted = [&self.key[..], &[n as u8, (n >> 8) as u8, (n >> 16) as u8, 0, 0]].concat();
        md5::compute(salted).0[..self.key.len() + 5].to_vec()
    }
}

fn rc4(key: &[u8], data: &[u8]) -> Vec<u8> {
    let mut s: [u8; 256] = std::array::from_fn(|i| i as u8);
    let mut j = 0u8;
    for i in 0..256 {
        j = j.wrapping_add(s[i]).wrapping_add(key[i % key.len()]);
        s.swap(i, j as usize);
    }
    let (mut i, mut j) = (0u8, 0u8);
    data.iter()
        .map(|&byte| {
            i = i.wrapping_add(1);
            j = j.wrapping_add(s[i as usize]);
            s.swap(i as usize, j as usize);
            byte ^ s[s[i as usize].wrapping_add(s[j as usize]) as usize]
        })
        .collect()
}

pub fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}
