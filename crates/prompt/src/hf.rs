//! [`PromptKit::from_hf_files`]: a kit from a Hugging Face model folder's `tokenizer.json` and
//! `tokenizer_config.json`.
//!
//! `tokenizer.json` is the tokenizer itself, read by the `tokenizers` crate as `transformers`
//! reads it. `tokenizer_config.json` adds what the tokenizer does not carry: the chat template
//! and the BOS/EOS token texts. Both keys come in the shapes `transformers` has written over the
//! years, and all are accepted: a token is a string or an `AddedToken` object
//! (`{"content": "<s>", ...}`); a chat template is a string or a list of
//! `{"name": ..., "template": ...}` of which the one named `default` is taken; `null` means none.
//!
//! [`PromptKit::from_hf_folder`] reads a whole model folder the way `transformers` and vLLM do:
//! those two files, `chat_template.jinja` (where `transformers` 4.43+ saves the template; it wins
//! over the config's), and `generation_config.json`'s `eos_token_id` (one id or a list, as Llama
//! 3 lists `<|end_of_text|>`, `<|eom_id|>` and `<|eot_id|>`), whose ids end generation too.
//!
//! Invariant: every error is [`PromptError::File`] and names the file at fault.

use std::path::{Path, PathBuf};

use serde_json::Value;
use tokenizers::Tokenizer;

use crate::PromptError;
use crate::kit::{KitParts, PromptKit};

/// A folder's tokenizer, which must exist.
pub const TOKENIZER_FILE: &str = "tokenizer.json";
/// A folder's tokenizer config (template, BOS, EOS), when it has one.
pub const TOKENIZER_CONFIG_FILE: &str = "tokenizer_config.json";
/// A folder's chat template as its own file, when it has one.
pub const CHAT_TEMPLATE_FILE: &str = "chat_template.jinja";
/// A folder's generation config (end tokens, sampling defaults), when it has one.
pub const GENERATION_CONFIG_FILE: &str = "generation_config.json";

impl PromptKit {
    /// Builds a kit from a Hugging Face model folder: see the module docs.
    pub fn from_hf_folder(dir: &Path) -> Result<Self, PromptError> {
        let present = |name: &str| Some(dir.join(name)).filter(|p| p.is_file());
        let template = present(CHAT_TEMPLATE_FILE)
            .map(|path| {
                std::fs::read_to_string(&path)
                    .map_err(|e| file_error(&path, format!("cannot read: {e}"), e))
                    .map(|text| (path, text))
            })
            .transpose()?;
        let config = present(TOKENIZER_CONFIG_FILE);
        let mut kit = Self::build(
            &dir.join(TOKENIZER_FILE),
            config.as_deref(),
            template
                .as_ref()
                .map(|(path, text)| (path.as_path(), text.clone())),
        )?;
        if let Some(path) = present(GENERATION_CONFIG_FILE) {
            let ids = generation_eos_ids(&path)?;
            kit = kit
                .with_stop_ids(&ids)
                .map_err(|e| file_error(&path, e.to_string(), e))?;
        }
        Ok(kit)
    }

    /// Builds a kit from `tokenizer.json` and, when given, `tokenizer_config.json` (chat
    /// template, BOS and EOS). Without the config the kit has no template and no BOS/EOS.
    pub fn from_hf_files(
        tokenizer_json: &Path,
        tokenizer_config_json: Option<&Path>,
    ) -> Result<Self, PromptError> {
        Self::build(tokenizer_json, tokenizer_config_json, None)
    }

    /// [`Self::from_hf_files`], the chat template taken from `template` (its file and text)
    /// when given.
    fn build(
        tokenizer_json: &Path,
        tokenizer_config_json: Option<&Path>,
        template: Option<(&Path, String)>,
    ) -> Result<Self, PromptError> {
        let bytes = std::fs::read(tokenizer_json)
            .map_err(|e| file_error(tokenizer_json, format!("cannot read: {e}"), e))?;
        let tokenizer = Tokenizer::from_bytes(&bytes).map_err(|e| PromptError::File {
            path: tokenizer_json.to_owned(),
            problem: format!("not a valid tokenizer.json: {e}"),
            source: Some(e),
        })?;
        let mut config = match tokenizer_config_json {
            Some(path) => TokenizerConfig::read(path)?,
            None => TokenizerConfig::default(),
        };
        // What `new` can reject (a token missing from the vocabulary, a template that does not
        // compile) comes from the config file, so that is the file to name (or the template's).
        let mut blame = tokenizer_config_json.unwrap_or(tokenizer_json);
        if let Some((path, text)) = template {
            config.chat_template = Some(text);
            blame = path;
        }
        Self::new(KitParts {
            tokenizer,
            chat_template: config.chat_template,
            bos_token: config.bos_token,
            eos_token: config.eos_token,
            stop_token_ids: None,
        })
        .map_err(|e| file_error(blame, e.to_string(), e))
    }
}

/// `eos_token_id` of a `generation_config.json`: one id, a list, or none.
fn generation_eos_ids(path: &Path) -> Result<Vec<u32>, PromptError> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| file_error(path, format!("cannot read: {e}"), e))?;
    let doc: Value = serde_json::from_str(&text)
        .map_err(|e| file_error(path, format!("not valid JSON: {e}"), e))?;
    let bad = |value: &Value| PromptError::File {
        path: path.to_owned(),
        problem: format!("`eos_token_id` is neither a token id nor a list of them: {value}"),
        source: None,
    };
    let id = |value: &Value| {
        value
            .as_u64()
            .and_then(|id| u32::try_from(id).ok())
            .ok_or_else(|| bad(value))
    };
    match doc.get("eos_token_id") {
        None | Some(Value::Null) => Ok(Vec::new()),
        Some(Value::Array(ids)) => ids.iter().map(id).collect(),
        Some(one) => Ok(vec![id(one)?]),
    }
}

fn file_error(
    path: &Path,
    problem: String,
    source: impl std::error::Error + Send + Sync + 'static,
) -> PromptError {
    PromptError::File {
        path: path.to_owned(),
        problem,
        source: Some(Box::new(source)),
    }
}

/// The parts of `tokenizer_config.json` a kit needs.
#[derive(Debug, Default, PartialEq)]
struct TokenizerConfig {
    chat_template: Option<String>,
    bos_token: Option<String>,
    eos_token: Option<String>,
}

impl TokenizerConfig {
    fn read(path: &Path) -> Result<Self, PromptError> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| file_error(path, format!("cannot read: {e}"), e))?;
        let doc: Value = serde_json::from_str(&text)
            .map_err(|e| file_error(path, format!("not valid JSON: {e}"), e))?;
        Self::from_json(&doc).map_err(|problem| PromptError::File {
            path: PathBuf::from(path),
            problem: problem.to_string(),
            source: None,
        })
    }

    fn from_json(doc: &Value) -> Result<Self, ConfigError> {
        let Value::Object(doc) = doc else {
            return Err(ConfigError::NotAnObject);
        };
        let chat_template = match doc.get("chat_template") {
            None | Some(Value::Null) => None,
            Some(Value::String(template)) => Some(template.clone()),
            Some(Value::Array(named)) => Some(default_template(named)?),
            Some(other) => return Err(ConfigError::TemplateShape(other.to_string())),
        };
        Ok(Self {
            chat_template,
            bos_token: token(doc, "bos_token")?,
            eos_token: token(doc, "eos_token")?,
        })
    }
}

/// What is wrong with a `tokenizer_config.json`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum ConfigError {
    #[error("not a JSON object")]
    NotAnObject,
    #[error("`chat_template` is neither a string nor a list of named templates: {0}")]
    TemplateShape(String),
    #[error("`chat_template` list entry is not {{\"name\": string, \"template\": string}}: {0}")]
    TemplateEntry(String),
    #[error("`chat_template` lists no template named `default` (it has: {})", .0.join(", "))]
    NoDefaultTemplate(Vec<String>),
    #[error("`{0}` is an object without a string `content`")]
    TokenWithoutContent(String),
    #[error("`{key}` is neither a string nor an object with `content`: {value}")]
    TokenShape { key: String, value: String },
}

/// The template named `default` in a list of `{"name": ..., "template": ...}`.
fn default_template(named: &[Value]) -> Result<String, ConfigError> {
    let mut names = Vec::with_capacity(named.len());
    for entry in named {
        let name = entry.get("name").and_then(Value::as_str);
        let template = entry.get("template").and_then(Value::as_str);
        match (name, template) {
            (Some("default"), Some(template)) => return Ok(template.to_owned()),
            (Some(name), Some(_)) => names.push(name.to_owned()),
            _ => return Err(ConfigError::TemplateEntry(entry.to_string())),
        }
    }
    Err(ConfigError::NoDefaultTemplate(names))
}

/// A special token: a string, an `AddedToken` object with `content`, or `null`.
fn token(doc: &serde_json::Map<String, Value>, key: &str) -> Result<Option<String>, ConfigError> {
    match doc.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(text)) => Ok(Some(text.clone())),
        Some(Value::Object(obj)) => match obj.get("content") {
            Some(Value::String(text)) => Ok(Some(text.clone())),
            _ => Err(ConfigError::TokenWithoutContent(key.to_owned())),
        },
        Some(other) => Err(ConfigError::TokenShape {
            key: key.to_owned(),
            value: other.to_string(),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::template::ChatMessage;
    use crate::vocab::tests::tiny_vocab;

    const CHATML: &str = "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}";

    /// A folder with tiny_vocab's tokenizer.json and the given tokenizer_config.json text.
    fn folder(config: Option<&str>) -> (tempfile::TempDir, PathBuf, Option<PathBuf>) {
        let dir = tempfile::tempdir().expect("tempdir");
        let tokenizer = dir.path().join("tokenizer.json");
        tiny_vocab()
            .to_tokenizer()
            .expect("tokenizer")
            .save(&tokenizer, false)
            .expect("save");
        let config = config.map(|text| {
            let path = dir.path().join("tokenizer_config.json");
            std::fs::write(&path, text).expect("write config");
            path
        });
        (dir, tokenizer, config)
    }

    fn parse(json: &str) -> Result<TokenizerConfig, ConfigError> {
        TokenizerConfig::from_json(&serde_json::from_str(json).expect("json"))
    }

    #[test]
    fn config_shapes() {
        let plain = parse(r#"{"chat_template": "T", "bos_token": "<s>", "eos_token": "</s>"}"#);
        assert_eq!(
            plain,
            Ok(TokenizerConfig {
                chat_template: Some("T".into()),
                bos_token: Some("<s>".into()),
                eos_token: Some("</s>".into()),
            })
        );
        let objects = parse(
            r#"{"chat_template": [{"name": "tool_use", "template": "U"}, {"name": "default", "template": "D"}],
                "bos_token": {"content": "<s>", "lstrip": false, "__type": "AddedToken"},
                "eos_token": null}"#,
        );
        assert_eq!(
            objects,
            Ok(TokenizerConfig {
                chat_template: Some("D".into()),
                bos_token: Some("<s>".into()),
                eos_token: None,
            })
        );
        assert_eq!(parse("{}"), Ok(TokenizerConfig::default()));
    }

    #[test]
    fn config_errors_say_what_is_wrong() {
        let no_default = parse(r#"{"chat_template": [{"name": "rag", "template": "R"}]}"#);
        assert_eq!(
            no_default.unwrap_err().to_string(),
            "`chat_template` lists no template named `default` (it has: rag)"
        );
        let bad_list = parse(r#"{"chat_template": [{"template": "R"}]}"#);
        assert!(bad_list.unwrap_err().to_string().contains("list entry"));
        let bad_token = parse(r#"{"eos_token": {"id": 3}}"#);
        assert_eq!(
            bad_token,
            Err(ConfigError::TokenWithoutContent("eos_token".into()))
        );
        let number = parse(r#"{"bos_token": 1}"#);
        assert!(number.unwrap_err().to_string().contains("`bos_token`"));
        assert_eq!(parse("[]"), Err(ConfigError::NotAnObject));
    }

    #[test]
    fn kit_from_files_encodes_and_renders() {
        let config = serde_json::json!({
            "chat_template": CHATML,
            "bos_token": {"content": "<|im_start|>"},
            "eos_token": "<|im_end|>",
        })
        .to_string();
        let (_dir, tokenizer, config) = folder(Some(&config));
        let kit = PromptKit::from_hf_files(&tokenizer, config.as_deref()).expect("kit");
        assert_eq!(kit.bos().map(|t| t.id), Some(0));
        assert_eq!(kit.eos().map(|t| t.id), Some(1));
        assert_eq!(kit.stop_token_ids(), [1]);
        let ids = kit.encode("hello world", false).expect("encode");
        assert_eq!(kit.decode(&ids, false).expect("decode"), "hello world");
        let text = kit
            .render_chat(&[ChatMessage::new("user", "hi")], true, &Default::default())
            .expect("render");
        assert_eq!(
            text,
            "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
        );
    }

    #[test]
    fn kit_without_config_has_no_template() {
        let (_dir, tokenizer, _) = folder(None);
        let kit = PromptKit::from_hf_files(&tokenizer, None).expect("kit");
        assert!(kit.chat_template().is_none());
        assert!(kit.bos().is_none() && kit.eos().is_none());
    }

    #[test]
    fn every_error_names_its_file() {
        let (dir, tokenizer, config) = folder(Some(r#"{"eos_token": "<|nope|>"}"#));
        let config = config.expect("config");
        let cases = [
            // Missing tokenizer.json.
            PromptKit::from_hf_files(&dir.path().join("missing.json"), None),
            // A token the vocabulary lacks.
            PromptKit::from_hf_files(&tokenizer, Some(&config)),
            // Missing config.
            PromptKit::from_hf_files(&tokenizer, Some(&dir.path().join("nope_config.json"))),
        ];
        let names = ["missing.json", "tokenizer_config.json", "nope_config.json"];
        for (result, name) in cases.into_iter().zip(names) {
            let err = result.expect_err(name).to_string();
            assert!(err.contains(name), "{err}");
        }

        std::fs::write(&config, "{not json").expect("write");
        let err = PromptKit::from_hf_files(&tokenizer, Some(&config)).expect_err("json");
        assert!(
            err.to_string()
                .contains("tokenizer_config.json: not valid JSON"),
            "{err}"
        );

        std::fs::write(&config, r#"{"chat_template": "{% for %}"}"#).expect("write");
        let err = PromptKit::from_hf_files(&tokenizer, Some(&config)).expect_err("template");
        assert!(err.to_string().contains("tokenizer_config.json"), "{err}");

        std::fs::write(&tokenizer, r#"{"model": 3}"#).expect("write");
        let err = PromptKit::from_hf_files(&tokenizer, None).expect_err("tokenizer");
        assert!(
            err.to_string()
                .contains("tokenizer.json: not a valid tokenizer.json"),
            "{err}"
        );
    }
}
