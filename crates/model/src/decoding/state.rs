//! One sequence's decoding state: picks each next token, decides when the sequence is done,
//! and releases its text incrementally without ever releasing part of a stop string or of a
//! UTF-8 character. The lockstep loop and the scheduler both drive it, so they agree.

use serde::Serialize;
use tokenizers::Tokenizer;

use crate::decoding::detokenize::IncrementalDecoder;
use crate::decoding::grammar::Grammar;
use crate::decoding::logits::LogitsChain;
use crate::decoding::logprobs::{log_softmax, TokenLogprob};
use crate::decoding::sampling::{Sampler, SamplingParams};
use crate::error::{Error, Result};

/// How one sequence is to be decoded.
pub struct DecodingOptions<'a> {
    pub sampling: &'a SamplingParams,
    /// A constraint every generated token must keep satisfiable.
    pub grammar: Option<&'a Grammar>,
    pub stop: &'a [String],
    /// Report each token's log-probability with this many alternatives; `None`: do not.
    pub top_logprobs: Option<usize>,
    /// Release text token by token (otherwise text is decoded only where stop strings need it,
    /// and once at the end).
    pub stream: bool,
    /// Append the tokens the grammar forces without a forward pass each: they go through the
    /// model together with the next chosen token, in one pass.
    pub fast_forward: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum FinishReason {
    /// An end-of-sequence token or a stop string.
    Stop,
    /// The token limit.
    Length,
    /// The client went away.
    Cancelled,
    /// The request's deadline passed.
    Timeout,
    /// The engine failed on this request.
    Error,
}

impl FinishReason {
    /// The name used in JSON output and metric labels.
    pub fn as_str(self) -> &'static str {
        match self {
            FinishReason::Stop => "stop",
            FinishReason::Length => "length",
            FinishReason::Cancelled => "cancelled",
            FinishReason::Timeout => "timeout",
            FinishReason::Error => "error",
        }
    }
}

pub struct Decoding {
    /// Repetition penalty, grammar, temperature, top-k, top-p: what shapes the logits.
    chain: LogitsChain,
    sampler: Sampler,
    /// How many alternatives to report with each token's log-probability; `None`: none at all.
    top_logprobs: Option<usize>,
    logprobs: Vec<TokenLogprob>,
    /// Prompt and generated tokens, for the repetition penalty. The generated ones past
    /// `released_tokens` were forced by the grammar and not yet run through the model.
    history: Vec<u32>,
    prompt_len: usize,
    /// Generated tokens returned as steps.
    released_tokens: usize,
    /// Forward passes that produced this sequence's steps.
    passes: usize,
    fast_forward: bool,
    eos: Vec<u32>,
    stop: Vec<String>,
    /// Longest stop string in bytes: that much minus one is held back until it cannot start one.
    longest_stop: usize,
    max_new: usize,
    /// Whether text is decoded as tokens arrive: for streaming, or to watch for stop strings.
    track_text: bool,
    decoder: IncrementalDecoder,
    /// Text decoded so far and how much of it has been released.
    text: String,
    released: usize,
    finish: Option<FinishReason>,
}

/// What one step produced.
pub struct Step {
    pub token: u32,
    /// Its log-probability, when the request asked for them.
    pub logprob: Option<TokenLogprob>,
    /// Text newly safe to show; empty while a character or a possible stop string is pending.
    pub delta: String,
}

impl Decoding {
    pub fn new(prompt: &[u32], options: &DecodingOptions, eos: Vec<u32>, max_new: usize) -> Self {
        let stop: Vec<String> = options.stop.iter().filter(|s| !s.is_empty()).cloned().collect();
        Self {
            track_text: options.stream || !stop.is_empty(),
            chain: LogitsChain::new(options.sampling, options.grammar),
            sampler: Sampler::new(options.sampling),
            top_logprobs: options.top_logprobs,
            logprobs: Vec::new(),
            history: prompt.to_vec(),
            prompt_len: prompt.len(),
            released_tokens: 0,
            passes: 0,
            fast_forward: options.fast_forward && options.grammar.is_some(),
            eos,
            longest_stop: stop.iter().map(String::len).max().unwrap_or(0),
            stop,
            max_new,
            decoder: IncrementalDecoder::new(),
            text: String::new(),
            released: 0,
            finish: None,
        }
    }

    /// Whether [`prepare`](Self::prepare) has work worth running beside the forward pass.
    pub fn has_preparation(&self) -> bool {
        self.chain.has_preparation()
    }

    /// Work for the next step that does not need its logits (the grammar's mask).
    pub fn prepare(&mut self) {
        self.chain.prepare();
    }

    /// Logits rows the next step needs, counted back from the last of the sequence's new
    /// tokens: the forced tokens' own rows when log-probabilities are reported, else only the
    /// last row, which the next token is chosen from.
    pub fn logit_rows(&self) -> usize {
        match self.top_logprobs {
            Some(_) => self.forced_pending() + 1,
            None => 1,
        }
    }

    /// Forced tokens in the history not yet returned as steps.
    fn forced_pending(&self) -> usize {
        self.generated().len() - self.released_tokens
    }

    /// Tokens from position `from` on: what the model has yet to run when its cache holds
    /// `from` tokens (the last chosen token and any the grammar forced after it).
    pub fn tokens_from(&self, from: usize) -> &[u32] {
        &self.history[from.min(self.history.len())..]
    }

    /// Releases the forced tokens the last pass ran (scored by their `rows`, when reported),
    /// then chooses the next token from the last row (modified in place) and appends whatever
    /// the grammar forces after it.
    pub fn step(&mut self, rows: &mut [Vec<f32>], tokenizer: &Tokenizer) -> Result<Vec<Step>> {
        self.passes += 1;
        let forced = self.generated()[self.released_tokens..].to_vec();
        let scored = rows.len() == forced.len() + 1;
        let mut steps = Vec::with_capacity(forced.len() + 1);
        for (i, token) in forced.into_iter().enumerate() {
            let logprob = self.top_logprobs.filter(|_| scored).map(|top| TokenLogprob::forced(&log_softmax(&rows[i]), token, top));
            steps.push(self.release(token, logprob, tokenizer)?);
            if self.finish.is_some() {
                // A stop string or the limit within the forced run: what follows is not the answer.
                self.history.truncate(self.prompt_len + self.released_tokens);
                return Ok(steps);
            }
        }
        let logits = rows.last_mut().ok_or_else(|| Error::InvalidRequest("a step needs logits".into()))?;
        let raw = self.top_logprobs.map(|_| log_softmax(logits));
        self.chain.process(logits, &self.history);
        let token = self.sampler.choose(logits);
        self.chain.accept(token);
        let logprob = raw.map(|raw| TokenLogprob::new(&raw, logits, token, self.top_logprobs.unwrap_or(0)));
        self.history.push(token);
        steps.push(self.release(token, logprob, tokenizer)?);
        if self.fast_forward {
            while self.finish.is_none() && self.generated().len() < self.max_new {
                let Some(forced) = self.chain.forced_token() else { break };
                self.sampler.skip();
                self.chain.accept(forced);
                self.history.push(forced);
            }
        }
        Ok(steps)
    }

    /// Returns a token of the history as a step: its text, and whether it ends the sequence.
    fn release(&mut self, token: u32, logprob: Option<TokenLogprob>, tokenizer: &Tokenizer) -> Result<Step> {
        self.released_tokens += 1;
        self.logprobs.extend(logprob.clone());
        if !self.track_text {
            self.finish_after(token, false);
            return Ok(Step { token, logprob, delta: String::new() });
        }
        if let Some(piece) = self.decoder.push(tokenizer, token)? {
            self.text.push_str(&piece);
        }
        // Occurrences cannot start before `released`: that text was checked when it was held.
        let stop_at = first_stop(&self.text[self.released..], &self.stop).map(|i| i + self.released);
        let safe = match stop_at {
            Some(at) => at,
            None => floor_char_boundary(&self.text, self.text.len().saturating_sub(self.longest_stop.saturating_sub(1))),
        };
        let delta = self.text[self.released..safe.max(self.released)].to_string();
        self.released = safe.max(self.released);
        self.finish_after(token, stop_at.is_some());
        Ok(Step { token, logprob, delta })
    }

    fn finish_after(&mut self, token: u32, stopped: bool) {
        if self.eos.contains(&token) || stopped {
            self.finish = Some(FinishReason::Stop);
        } else if self.released_tokens >= self.max_new {
            self.finish = Some(FinishReason::Length);
        }
    }

    pub fn finish_reason(&self) -> Option<FinishReason> {
        self.finish
    }

    /// Ends the sequence early (cancelled, timed out, failed); forced tokens not yet returned
    /// are dropped.
    pub fn end(&mut self, reason: FinishReason) {
        self.finish.get_or_insert(reason);
        self.history.truncate(self.prompt_len + self.released_tokens);
    }

    pub fn generated(&self) -> &[u32] {
        &self.history[self.prompt_len..]
    }

    /// Log-probabilities of every generated token, when the request asked for them.
    pub fn logprobs(&self) -> &[TokenLogprob] {
        &self.logprobs
    }

    /// Forward passes so far; fewer than the generated tokens when a grammar forced some.
    pub fn passes(&self) -> usize {
        self.passes
    }

    pub fn prompt_len(&self) -> usize {
        self.prompt_len
    }

    /// The final text, decoded from every generated token at once and cut at the first stop
    /// string, and the part of it not yet released.
    pub fn final_text(&self, tokenizer: &Tokenizer) -> Result<(String, String)> {
        let mut text = tokenizer.decode(self.generated(), true).map_err(|e| Error::Tokenizer(e.to_string()))?;
        if let Some(cut) = first_stop(&text, &self.stop) {
            text.truncate(cut);
        }
        let released = &self.text[..self.released];
        let rest = text.strip_prefix(released).unwrap_or_default().to_string();
        Ok((text, rest))
    }
}

/// Where the earliest stop string starts in `text`, if any.
fn first_stop(text: &str, stops: &[String]) -> Option<usize> {
    stops.iter().filter_map(|s| text.find(s.as_str())).min()
}

fn floor_char_boundary(s: &str, mut i: usize) -> usize {
    while !s.is_char_boundary(i) {
        i -= 1;
    }
    i
}
