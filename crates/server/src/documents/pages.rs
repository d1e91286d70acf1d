//! Which pages of a document to read: the `pages` option (`1-3,7`, `5-` for the fifth to the
//! last), checked for syntax when the request arrives and against the document once its page
//! count is known.

use std::fmt;
use std::str::FromStr;

/// Page numbers as the caller wrote them: 1-based, inclusive ranges, an open end meaning the
/// last page.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PageSelection(Vec<(u32, Option<u32>)>);

impl PageSelection {
    /// Exactly these pages, in this order.
    pub fn of(pages: &[u32]) -> Self {
        Self(pages.iter().map(|&p| (p, Some(p))).collect())
    }

    /// The page numbers selected in a document of `page_count` pages, ascending and each
    /// once. A page past the end is an error naming it.
    pub fn resolve(&self, page_count: u32) -> Result<Vec<u32>, String> {
        let mut pages = Vec::new();
        for &(first, last) in &self.0 {
            let last = last.unwrap_or(page_count);
            if first > page_count || last > page_count {
                let range = if first == last { first.to_string() } else { format!("{first}-{last}") };
                let plural = if page_count == 1 { "" } else { "s" };
                return Err(format!("pages: {range} is outside the document, which has {page_count} page{plural}"));
            }
            pages.extend(first..=last);
        }
        pages.sort_unstable();
        pages.dedup();
        Ok(pages)
    }
}

impl FromStr for PageSelection {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        let bad = |why: &str| format!("pages must be page numbers and ranges like `1-3,7` (from 1): {why}");
        let number = |s: &str| -> Result<u32, String> {
            match s.trim().parse::<u32>() {
                Ok(0) => Err(bad("pages count from 1")),
                Ok(n) => Ok(n),
                Err(_) => Err(bad(&format!("`{}` is not a page number", s.trim()))),
            }
        };
        let mut ranges = Vec::new();
        for part in text.split(',') {
            let part = part.trim();
            let range = match part.split_once('-') {
                None => {
                    let n = number(part)?;
                    (n, Some(n))
                }
                Some((first, "")) => (number(first)?, None),
                Some((first, last)) => {
                    let (first, last) = (number(first)?, number(last)?);
                    if first > last {
                        return Err(bad(&format!("`{part}` runs backwards")));
                    }
                    (first, Some(last))
                }
            };
            ranges.push(range);
        }
        Ok(Self(ranges))
    }
}

/// The canonical spelling, which [`FromStr`] reads back.
impl fmt::Display for PageSelection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, &(first, last)) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str(",")?;
            }
            match last {
                Some(last) if last == first => write!(f, "{first}")?,
                Some(last) => write!(f, "{first}-{last}")?,
                None => write!(f, "{first}-")?,
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pages(text: &str, count: u32) -> Result<Vec<u32>, String> {
        text.parse::<PageSelection>()?.resolve(count)
    }

    #[test]
    fn ranges_and_single_pages_resolve_ascending_and_once() {
        assert_eq!(pages("1-3,7", 9).unwrap(), [1, 2, 3, 7]);
        assert_eq!(pages(" 7 , 2-3,3 ", 9).unwrap(), [2, 3, 7]);
        assert_eq!(pages("8-", 9).unwrap(), [8, 9]);
        assert_eq!(pages("2-2", 2).unwrap(), [2]);
    }

    #[test]
    fn pages_outside_the_document_are_named() {
        let err = pages("2-4", 3).unwrap_err();
        assert!(err.contains("2-4") && err.contains("3 pages"), "{err}");
        assert!(pages("4-", 3).unwrap_err().contains("4-3"));
        assert_eq!(pages("2", 1).unwrap_err(), "pages: 2 is outside the document, which has 1 page");
    }

    #[test]
    fn malformed_selections_say_why() {
        for (text, why) in [("", "not a page number"), ("0", "from 1"), ("3-1", "backwards"), ("a-b", "`a`"), ("1,,2", "not a page number")]
        {
            let err = text.parse::<PageSelection>().unwrap_err();
            assert!(err.contains(why), "{text}: {err}");
        }
    }

    #[test]
    fn display_reads_back() {
        for text in ["1-3,7", "5-", "2"] {
            assert_eq!(text.parse::<PageSelection>().unwrap().to_string(), text);
        }
        assert_eq!(PageSelection::of(&[2, 5]).to_string(), "2,5");
    }
}
