//! Shared by this crate's integration tests: the default model's tokenizer and template.

use std::path::PathBuf;
use std::sync::OnceLock;

use tidelock_prompt::PromptKit;

/// The default model's kit (SmolLM2-135M-Instruct, Q4_1 GGUF, at `$TIDELOCK_MODEL` or
/// `~/.cache/tidelock/models/`; `./scripts/test` fetches it), loaded once.
pub fn kit() -> &'static PromptKit {
    static KIT: OnceLock<PromptKit> = OnceLock::new();
    KIT.get_or_init(|| {
        let path = std::env::var_os("TIDELOCK_MODEL")
            .map(PathBuf::from)
            .unwrap_or_else(|| {
                PathBuf::from(std::env::var_os("HOME").unwrap_or_default())
                    .join(".cache/tidelock/models/SmolLM2-135M-Instruct.Q4_1.gguf")
            });
        assert!(
            path.is_file(),
            "the default model is missing at {}: run ./scripts/test",
            path.display()
        );
        PromptKit::from_gguf_file(&path).expect("kit")
    })
}
