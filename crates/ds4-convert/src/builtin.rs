//! The tiny built-in model: what `ds4 run`/`chat`/`serve` use when no model file is given.
//!
//! Random weights (deterministic, [`crate::synth`]) in the exact DeepSeek V4 Flash architecture
//! at toy size, with the **real** DeepSeek V4 tokenizer (embedded `tokenizer.json`, 129280 ids),
//! so prompts render and tokenize exactly as with the real model. Its text is gibberish.

use std::path::{Path, PathBuf};

use ds4_model::Shape;

use crate::error::{ConvertError, Result};
use crate::recipe::Recipe;
use crate::synth::{SYNTH_VERSION, SynthOptions, synth_gguf};

/// The official DeepSeek V4 tokenizer (`tokenizer.json`), embedded.
pub const TOKENIZER_JSON: &[u8] =
    include_bytes!("../../../tests/fixtures/tokenizer/tokenizer.json");

/// Seed of the built-in model's weights.
pub const SEED: u64 = 0x0d54_2026;

/// Shape of the built-in model: Flash's structure (6 layers: SWA, SWA, CSA, HCA, CSA, HCA; hash
/// routing on layers 0–2; 4 HC streams) with small widths and the real vocabulary.
pub fn tiny_shape() -> Shape {
    let mut s = Shape::flash_layers(6);
    s.n_embd = 256;
    s.n_head = 4;
    s.head_dim = 128;
    s.value_dim = 128;
    s.n_rot = 64;
    s.q_lora_rank = 128;
    s.o_groups = 2;
    s.o_lora_rank = 128;
    s.n_expert = 8;
    s.n_expert_used = 3;
    s.n_ff_exp = 256;
    s.index_heads = 8;
    s.index_head_dim = 64;
    s.index_topk = 16;
    s.context_length = 65536;
    s
}

/// Write the built-in model (q2 recipe: IQ2_XXS/Q2_K experts, Q8_0 attention, as ds4's files) to
/// `path`.
pub fn write_tiny(path: &Path) -> Result<()> {
    let tok = ds4_tokenizer::Tokenizer::from_tokenizer_json_bytes(TOKENIZER_JSON).map_err(|e| {
        ConvertError::Tokenizer {
            path: PathBuf::from("(built-in tokenizer.json)"),
            reason: e.to_string(),
        }
    })?;
    let opts = SynthOptions {
        shape: tiny_shape(),
        recipe: Recipe::Q2,
        seed: SEED,
        name: Some("ds4-rs built-in tiny model (random weights)".into()),
        vocab: Some(tok.gguf_vocab_metadata()),
    };
    synth_gguf(path, &opts, &mut |_| {})?;
    Ok(())
}

/// Path of the cached built-in model file, written on first use (into `dir`, default the
/// system temp dir). The name carries the generator version, so a change regenerates it.
pub fn tiny_path(dir: Option<&Path>) -> Result<PathBuf> {
    let dir = dir.map_or_else(std::env::temp_dir, Path::to_path_buf);
    let path = dir.join(format!(
        "ds4-rs-builtin-tiny-v{SYNTH_VERSION}-{SEED:x}.gguf"
    ));
    if !path.is_file() {
        write_tiny(&path)?;
    }
    Ok(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builtin_model_loads_and_has_the_real_tokenizer() {
        let dir = tempfile::tempdir().unwrap();
        let p = tiny_path(Some(dir.path())).unwrap();
        let g = ds4_gguf::Gguf::open(&p).unwrap();
        let shape = Shape::from_gguf(&g).unwrap();
        assert_eq!(shape, tiny_shape());
        let tok = ds4_tokenizer::Tokenizer::from_gguf(&g).unwrap();
        assert_eq!(tok.vocab_size(), 129280);
        assert_eq!(tok.encode("Hello").unwrap(), vec![19923]);
        // Second call reuses the file.
        let again = tiny_path(Some(dir.path())).unwrap();
        assert_eq!(again, p);
    }
}
