//! JSON-schema constraints, compiled by llguidance against this checkpoint's vocabulary.
//!
//! [`Vocabulary`] holds every token's bytes, read from `tokenizer.json` itself (llguidance's
//! own Hugging Face bridge would compile a second, older `tokenizers`), and the token trie
//! llguidance walks to compute masks. [`Vocabulary::compile`] turns a schema into a
//! [`Grammar`] once per distinct schema; each constrained sequence then walks its own copy
//! ([`GrammarState`]).

use std::num::NonZeroUsize;
use std::path::Path;
use std::sync::{Arc, Mutex};

use llguidance::api::TopLevelGrammar;
use llguidance::toktrie::{ApproximateTokEnv, SimpleVob, TokEnv, TokRxInfo, TokTrie};
use llguidance::{JsonCompileOptions, Matcher, ParserFactory};
use lru::LruCache;
use serde_json::Value;

use crate::error::{Error, Result};

/// Distinct compiled schemas kept for reuse.
const GRAMMAR_CACHE_ENTRIES: usize = 64;

/// The checkpoint's tokens as bytes, and the compiler of constraints over them.
pub struct Vocabulary {
    factory: ParserFactory,
    eos: Vec<u32>,
    cache: Mutex<LruCache<String, Arc<Grammar>>>,
}

impl Vocabulary {
    /// Reads `tokenizer.json`; `eos` are the ids that end a sequence (all of them end a
    /// constrained one too, once its grammar accepts).
    pub fn load(tokenizer_json: &Path, eos: &[u32]) -> Result<Self> {
        let bad = |reason: String| Error::Config { file: tokenizer_json.display().to_string(), reason };
        let text = std::fs::read(tokenizer_json).map_err(|e| Error::io(tokenizer_json, e))?;
        let json: Value = serde_json::from_slice(&text).map_err(|e| bad(e.to_string()))?;
        let words = llguidance::token_bytes_from_tokenizer_json(&json).map_err(|e| bad(e.to_string()))?;
        let first_eos = *eos.first().ok_or_else(|| bad("no end-of-sequence token".into()))?;
        let info = TokRxInfo::new(words.len() as u32, first_eos);
        let trie = TokTrie::from(&info, &words).with_eos_tokens(eos);
        let env: TokEnv = Arc::new(ApproximateTokEnv::new(trie));
        let mut factory = ParserFactory::new_simple(&env).map_err(|e| bad(e.to_string()))?;
        factory.quiet();
        let cache = Mutex::new(LruCache::new(NonZeroUsize::new(GRAMMAR_CACHE_ENTRIES).expect("nonzero")));
        Ok(Self { factory, eos: eos.to_vec(), cache })
    }

    fn trie(&self) -> &TokTrie {
        self.factory.tok_env().tok_trie()
    }

    /// Tokens the trie knows; the model's logits may be wider (padding rows).
    pub fn len(&self) -> usize {
        self.trie().vocab_size()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The bytes a token stands for; a special token's bytes are its name (`<|im_end|>`).
    pub fn token_bytes(&self, token: u32) -> Vec<u8> {
        if (token as usize) >= self.len() {
            return Vec::new();
        }
        let bytes = self.trie().token(token);
        match bytes.first() {
            Some(&TokTrie::SPECIAL_TOKEN_MARKER) => bytes[1..].to_vec(),
            _ => bytes.to_vec(),
        }
    }

    /// Whether the token is a special one (`<|im_end|>`, vision markers): no text of its own.
    pub fn is_special(&self, token: u32) -> bool {
        (token as usize) < self.len() && self.trie().is_special_token(token)
    }

    /// A grammar that accepts exactly the compact JSON texts valid under `schema`. Schemas
    /// with keywords llguidance cannot enforce are refused, never half-enforced.
    pub fn compile(&self, schema: &Value) -> Result<Arc<Grammar>> {
        self.compile_with(schema, false)
    }

    /// [`compile`](Self::compile), optionally decoding every `oneOf` as `anyOf` (exact only
    /// where the alternatives exclude each other: `crate::schema` decides when to ask).
    pub fn compile_with(&self, schema: &Value, one_of_as_any_of: bool) -> Result<Arc<Grammar>> {
        if !schema.is_object() && !schema.is_boolean() {
            return Err(Error::Schema("a JSON Schema must be an object".into()));
        }
        let key = format!("{one_of_as_any_of}{schema}");
        if let Some(hit) = self.cache.lock().expect("grammar cache lock").get(&key) {
            return Ok(hit.clone());
        }
        let mut schema = schema.clone();
        if let Some(object) = schema.as_object_mut() {
            // Compact separators and no free whitespace: every byte the model writes is data,
            // and a schema whose strings are bounded has a bounded answer.
            let compact = JsonCompileOptions {
                item_separator: ",".into(),
                key_separator: ":".into(),
                whitespace_flexible: false,
                coerce_one_of: one_of_as_any_of,
                ..JsonCompileOptions::default()
            };
            object.remove("x-guidance");
            compact.apply_to(&mut schema);
        }
        let parser = self.factory.create_parser(TopLevelGrammar::from_json_schema(schema)).map_err(|e| Error::Schema(e.to_string()))?;
        let grammar = Arc::new(Grammar { start: Mutex::new(Matcher::new(Ok(parser))), eos: self.eos.clone() });
        self.cache.lock().expect("grammar cache lock").put(key, grammar.clone());
        Ok(grammar)
    }
}

/// A compiled constraint in its start state; [`GrammarState::new`] copies it per sequence.
pub struct Grammar {
    start: Mutex<Matcher>,
    eos: Vec<u32>,
}

impl std::fmt::Debug for Grammar {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Grammar")
    }
}

/// One sequence's walk through a grammar: which tokens may come next, and the tokens so far.
pub struct GrammarState {
    matcher: Matcher,
    eos: Vec<u32>,
    /// The mask for the next token, computed ahead (possibly while the model runs).
    next: Option<SimpleVob>,
}

impl GrammarState {
    pub fn new(grammar: &Grammar) -> Self {
        Self { matcher: grammar.start.lock().expect("grammar lock").deep_clone(), eos: grammar.eos.clone(), next: None }
    }

    /// Computes the mask for the next token, unless already done.
    pub fn prepare(&mut self) {
        if self.next.is_none() {
            let eos = &self.eos;
            let mask = self.matcher.compute_mask_or_eos().unwrap_or_else(|e| {
                // An internal failure of the matcher: end the sequence rather than write
                // unconstrained text.
                tracing::warn!(error = %e, "grammar failed; ending the sequence");
                let mut only_eos = SimpleVob::alloc(eos.iter().max().map_or(0, |&m| m as usize + 1));
                eos.iter().for_each(|&e| only_eos.allow_token(e));
                only_eos
            });
            self.next = Some(mask);
        }
    }

    /// Sets every token the grammar does not allow next to minus infinity, including logits
    /// past the end of the vocabulary (the model's padding rows) and special tokens.
    pub fn mask(&mut self, logits: &mut [f32]) {
        self.prepare();
        let mask = self.next.as_ref().expect("prepared");
        // Every end-of-sequence id ends an accepted answer, not only the one llguidance knows.
        let eos_allowed = self.eos.iter().any(|&e| mask.is_allowed(e));
        let eos_logits: Vec<(usize, f32)> = if eos_allowed {
            self.eos.iter().filter_map(|&e| logits.get(e as usize).map(|&l| (e as usize, l))).collect()
        } else {
            Vec::new()
        };
        // One 32-token word of the mask at a time: most words are all allowed or all refused.
        let words = mask.as_slice();
        for (w, chunk) in logits.chunks_mut(32).enumerate() {
            match words.get(w).copied().unwrap_or(0) {
                u32::MAX if chunk.len() == 32 && (w + 1) * 32 <= mask.len() => {}
                0 => chunk.fill(f32::NEG_INFINITY),
                bits => {
                    for (j, logit) in chunk.iter_mut().enumerate() {
                        if bits >> j & 1 == 0 || w * 32 + j >= mask.len() {
                            *logit = f32::NEG_INFINITY;
                        }
                    }
                }
            }
        }
        for (e, l) in eos_logits {
            logits[e] = l;
        }
    }

    /// The one token the grammar allows next, when it allows exactly one and that one is not
    /// an end-of-sequence token (which end token closes an answer is the model's choice). Such
    /// a token is what greedy and sampled decoding would both pick, whatever the logits.
    pub fn forced_token(&mut self) -> Option<u32> {
        self.prepare();
        let mask = self.next.as_ref().expect("prepared");
        if mask.num_set() != 1 {
            return None;
        }
        let mut only = None;
        mask.iter_set_entries(|t| only = Some(t as u32));
        only.filter(|t| !self.eos.contains(t))
    }

    /// Advances past the chosen token (an end-of-sequence token ends the walk instead).
    pub fn accept(&mut self, token: u32) {
        self.next = None;
        if self.eos.contains(&token) {
            return;
        }
        if let Err(e) = self.matcher.consume_token(token) {
            tracing::warn!(error = %e, token, "grammar refused a token it allowed");
        }
    }
}
