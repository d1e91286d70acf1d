//! Turning a conversation into token ids: the checkpoint's own Jinja chat template (rendered,
//! never hand-coded), its tokenizer, then one `<|image_pad|>` per merged visual token.

use std::path::Path;

use minijinja::{context, Environment, ErrorKind, Value as JinjaValue};
use serde::Serialize;
use serde_json::Value;
use tokenizers::Tokenizer;

use crate::config::{read_json, TokenIds};
use crate::error::{Error, Result};
use crate::loading::checkpoint::CheckpointFiles;

/// One part of a user message: images are placeholders here, their pixels travel separately.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ContentPart {
    Image,
    Text { text: String },
}

#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(untagged)]
pub enum Content {
    Text(String),
    Parts(Vec<ContentPart>),
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ChatMessage {
    pub role: String,
    pub content: Content,
}

impl ChatMessage {
    /// A user turn with the images first, then the text, as the seed workflow sends it.
    pub fn user_with_images(images: usize, text: &str) -> Self {
        let mut parts = vec![ContentPart::Image; images];
        parts.push(ContentPart::Text { text: text.to_string() });
        Self { role: "user".into(), content: Content::Parts(parts) }
    }

    pub fn image_count(&self) -> usize {
        match &self.content {
            Content::Text(_) => 0,
            Content::Parts(parts) => parts.iter().filter(|p| matches!(p, ContentPart::Image)).count(),
        }
    }
}

pub struct PromptBuilder {
    tokenizer: Tokenizer,
    env: Environment<'static>,
    tokens: TokenIds,
}

const TEMPLATE_NAME: &str = "chat";

impl PromptBuilder {
    pub fn load(files: &CheckpointFiles, tokens: TokenIds) -> Result<Self> {
        let tokenizer =
            Tokenizer::from_file(&files.tokenizer).map_err(|e| Error::Tokenizer(format!("{}: {e}", files.tokenizer.display())))?;
        let source = find_template(files)?;
        Self::new(tokenizer, source, tokens)
    }

    pub fn new(tokenizer: Tokenizer, template: String, tokens: TokenIds) -> Result<Self> {
        let mut env = Environment::new();
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", |msg: String| -> std::result::Result<JinjaValue, minijinja::Error> {
            Err(minijinja::Error::new(ErrorKind::InvalidOperation, msg))
        });
        env.add_template_owned(TEMPLATE_NAME, template).map_err(|e| Error::Template(e.to_string()))?;
        Ok(Self { tokenizer, env, tokens })
    }

    pub fn tokenizer(&self) -> &Tokenizer {
        &self.tokenizer
    }

    /// The template's text for `messages`, ending with the assistant's turn opener.
    pub fn render(&self, messages: &[ChatMessage]) -> Result<String> {
        let template = self.env.get_template(TEMPLATE_NAME).map_err(|e| Error::Template(e.to_string()))?;
        template
            .render(context! { messages => messages, add_generation_prompt => true, add_vision_id => false })
            .map_err(|e| Error::Template(e.to_string()))
    }

    /// Token ids for `messages`, with each image's placeholder repeated `visual_tokens[i]` times.
    pub fn encode(&self, messages: &[ChatMessage], visual_tokens: &[usize]) -> Result<Vec<u32>> {
        let text = self.render(messages)?;
        let encoding = self.tokenizer.encode(text.as_str(), false).map_err(|e| Error::Tokenizer(e.to_string()))?;
        expand_image_pads(encoding.get_ids(), self.tokens.image, visual_tokens)
    }

    /// Text for generated ids, special tokens left out.
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        self.tokenizer.decode(ids, true).map_err(|e| Error::Tokenizer(e.to_string()))
    }

    /// Text for generated ids with the special tokens kept (boxes are written with them).
    pub fn decode_with_special_tokens(&self, ids: &[u32]) -> Result<String> {
        self.tokenizer.decode(ids, false).map_err(|e| Error::Tokenizer(e.to_string()))
    }
}

/// Repeats the i-th image placeholder `counts[i]` times; the counts must match the placeholders.
pub fn expand_image_pads(ids: &[u32], image_token: u32, counts: &[usize]) -> Result<Vec<u32>> {
    let found = ids.iter().filter(|&&id| id == image_token).count();
    if found != counts.len() {
        return Err(Error::InvalidRequest(format!("the prompt has {found} image placeholders but {} images were given", counts.len())));
    }
    let mut out = Vec::with_capacity(ids.len() + counts.iter().sum::<usize>());
    let mut images = counts.iter();
    for &id in ids {
        if id == image_token {
            let n = *images.next().expect("counted above");
            out.extend(std::iter::repeat_n(image_token, n));
        } else {
            out.push(id);
        }
    }
    Ok(out)
}

/// The chat template, looked up where transformers looks: `chat_template.jinja`, then
/// `chat_template.json`, then `tokenizer_config.json`.
fn find_template(files: &CheckpointFiles) -> Result<String> {
    if let Some(path) = &files.chat_template_jinja {
        return std::fs::read_to_string(path).map_err(|e| Error::io(path, e));
    }
    let from_json = |path: &Path, file: &str| -> Result<Option<String>> {
        let value = read_json(path)?;
        match value.get("chat_template") {
            None | Some(Value::Null) => Ok(None),
            Some(Value::String(s)) => Ok(Some(s.clone())),
            // A list of named templates: take the default one.
            Some(Value::Array(list)) => Ok(list
                .iter()
                .find(|t| t.get("name").and_then(Value::as_str) == Some("default"))
                .or(list.first())
                .and_then(|t| t.get("template"))
                .and_then(Value::as_str)
                .map(str::to_string)),
            Some(_) => Err(Error::config(file, "`chat_template` must be a string or a list of templates")),
        }
    };
    if let Some(path) = &files.chat_template_json {
        if let Some(t) = from_json(path, "chat_template.json")? {
            return Ok(t);
        }
    }
    if let Some(path) = &files.tokenizer_config {
        if let Some(t) = from_json(path, "tokenizer_config.json")? {
            return Ok(t);
        }
    }
    Err(Error::config(
        "tokenizer_config.json",
        "the checkpoint has no chat template (chat_template.jinja, chat_template.json or tokenizer_config.json)",
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pads_expand_per_image() {
        assert_eq!(expand_image_pads(&[1, 9, 2, 9], 9, &[2, 3]).unwrap(), vec![1, 9, 9, 2, 9, 9, 9]);
        assert!(expand_image_pads(&[1, 9], 9, &[]).is_err());
    }
}
