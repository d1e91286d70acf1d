//! Incremental detokenisation: text deltas as tokens arrive, never splitting a UTF-8 character
//! (byte-level BPE tokens may each hold part of one).

use tokenizers::Tokenizer;

use crate::error::{Error, Result};

#[derive(Debug, Default, Clone)]
pub struct IncrementalDecoder {
    ids: Vec<u32>,
    /// Start of the window decoded for context (keeps merges across the boundary right).
    prefix_offset: usize,
    /// End of what has been emitted.
    read_offset: usize,
}

impl IncrementalDecoder {
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a token and returns the text it completes, if any; special tokens yield nothing.
    pub fn push(&mut self, tokenizer: &Tokenizer, id: u32) -> Result<Option<String>> {
        self.ids.push(id);
        let decode = |ids: &[u32]| tokenizer.decode(ids, true).map_err(|e| Error::Tokenizer(e.to_string()));
        let before = decode(&self.ids[self.prefix_offset..self.read_offset])?;
        let now = decode(&self.ids[self.prefix_offset..])?;
        // A trailing replacement character means the last token ended mid-character: wait.
        if now.len() <= before.len() || now.ends_with('\u{FFFD}') || !now.starts_with(&before) {
            return Ok(None);
        }
        self.prefix_offset = self.read_offset;
        self.read_offset = self.ids.len();
        Ok(Some(now[before.len()..].to_string()))
    }
}
