//! What can go wrong with the local model, on its own so that the forward pass, the tokenizer and
//! the loader can share it without depending on one another.

#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error("cannot read the model file {path}: {source}")]
    Open {
        path: String,
        source: std::io::Error,
    },
    #[error("the model file is not a usable GGUF: {0}")]
    Format(String),
    #[error("the conversation does not fit in the model's context of {0} tokens")]
    ContextFull(usize),
}
