//! Conversion recipes: the GGUF type of every tensor class.

use std::fmt;
use std::str::FromStr;

use ds4_gguf::GgmlType;

use crate::error::ConvertError;
use crate::names::TensorClass;

/// A type recipe for the output file (model-spec §2.3 "Published files").
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Recipe {
    /// Every tensor F32 (except tid2eid, I32): exact, for tests.
    F32,
    /// Matrices F16; norms, sinks, HC scale/base and the router bias F32.
    F16,
    /// ds4's q2 types with Q8_0 routed experts (every other Q8_0 tensor as in q2, F16 where ds4
    /// keeps F16).
    Q8_0,
    /// ds4's q2 file: IQ2_XXS routed gate/up, Q2_K routed down, Q8_0 attention / shared /
    /// output, F16 embedding / router / HC fn / compressor / indexer / ape, F32 vectors.
    Q2,
    /// ds4's q4 file: as q2 with Q4_K routed experts.
    Q4,
}

impl Recipe {
    /// Every recipe.
    pub const ALL: [Recipe; 5] = [
        Recipe::F32,
        Recipe::F16,
        Recipe::Q8_0,
        Recipe::Q2,
        Recipe::Q4,
    ];

    /// The name used on the command line and in `ds4.convert.recipe`.
    pub fn name(self) -> &'static str {
        match self {
            Recipe::F32 => "f32",
            Recipe::F16 => "f16",
            Recipe::Q8_0 => "q8_0",
            Recipe::Q2 => "q2",
            Recipe::Q4 => "q4",
        }
    }

    /// The GGUF type of a tensor of class `class`.
    pub fn tensor_type(self, class: TensorClass) -> GgmlType {
        use GgmlType as G;
        use TensorClass as C;
        match class {
            C::Tid2Eid => G::I32,
            C::Vector => G::F32,
            _ if self == Recipe::F32 => G::F32,
            _ if self == Recipe::F16 => G::F16,
            C::Embedding | C::HcFn | C::Dense16 | C::Ape => G::F16,
            C::Output | C::AttnProj | C::SharedExpert => G::Q8_0,
            C::ExpertGateUp => match self {
                Recipe::Q2 => G::IQ2_XXS,
                Recipe::Q4 => G::Q4_K,
                _ => G::Q8_0,
            },
            C::ExpertDown => match self {
                Recipe::Q2 => G::Q2_K,
                Recipe::Q4 => G::Q4_K,
                _ => G::Q8_0,
            },
        }
    }

    /// A llama.cpp-style `general.file_type` value describing the dominant type.
    pub fn file_type(self) -> u32 {
        match self {
            Recipe::F32 => 0,  // ALL_F32
            Recipe::F16 => 1,  // MOSTLY_F16
            Recipe::Q8_0 => 7, // MOSTLY_Q8_0
            Recipe::Q2 => 19,  // MOSTLY_IQ2_XXS
            Recipe::Q4 => 15,  // MOSTLY_Q4_K_M
        }
    }

    /// Whether the recipe writes block-quantized tensors.
    pub fn is_quantized(self) -> bool {
        !matches!(self, Recipe::F32 | Recipe::F16)
    }
}

impl fmt::Display for Recipe {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Recipe {
    type Err = ConvertError;

    fn from_str(s: &str) -> Result<Recipe, ConvertError> {
        let lower = s.trim().to_ascii_lowercase();
        let key = match lower.as_str() {
            "q8" | "q8-0" => "q8_0",
            other => other,
        };
        Recipe::ALL
            .into_iter()
            .find(|r| r.name() == key)
            .ok_or_else(|| ConvertError::UnknownRecipe(s.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use GgmlType as G;
    use TensorClass as C;

    #[test]
    fn parse_and_print() {
        for r in Recipe::ALL {
            assert_eq!(r.name().parse::<Recipe>().unwrap(), r);
            assert_eq!(r.to_string(), r.name());
        }
        assert_eq!("Q8_0".parse::<Recipe>().unwrap(), Recipe::Q8_0);
        assert!(matches!(
            "q3".parse::<Recipe>(),
            Err(ConvertError::UnknownRecipe(_))
        ));
    }

    #[test]
    fn q2_matches_ds4s_published_file() {
        let r = Recipe::Q2;
        assert_eq!(r.tensor_type(C::ExpertGateUp), G::IQ2_XXS);
        assert_eq!(r.tensor_type(C::ExpertDown), G::Q2_K);
        assert_eq!(r.tensor_type(C::AttnProj), G::Q8_0);
        assert_eq!(r.tensor_type(C::SharedExpert), G::Q8_0);
        assert_eq!(r.tensor_type(C::Output), G::Q8_0);
        for c in [C::Embedding, C::HcFn, C::Dense16, C::Ape] {
            assert_eq!(r.tensor_type(c), G::F16);
        }
        assert_eq!(r.tensor_type(C::Vector), G::F32);
        assert_eq!(r.tensor_type(C::Tid2Eid), G::I32);
        assert_eq!(Recipe::Q4.tensor_type(C::ExpertGateUp), G::Q4_K);
        assert_eq!(Recipe::Q4.tensor_type(C::ExpertDown), G::Q4_K);
        assert_eq!(Recipe::Q4.tensor_type(C::Embedding), G::F16);
        assert_eq!(Recipe::Q8_0.tensor_type(C::ExpertGateUp), G::Q8_0);
        assert_eq!(Recipe::Q8_0.tensor_type(C::ExpertDown), G::Q8_0);
        assert_eq!(Recipe::Q8_0.tensor_type(C::Dense16), G::F16);
    }

    #[test]
    fn plain_recipes() {
        for c in [
            C::Embedding,
            C::Output,
            C::HcFn,
            C::AttnProj,
            C::SharedExpert,
            C::Dense16,
            C::Ape,
            C::ExpertGateUp,
            C::ExpertDown,
        ] {
            assert_eq!(Recipe::F32.tensor_type(c), G::F32);
            assert_eq!(Recipe::F16.tensor_type(c), G::F16);
        }
        assert_eq!(Recipe::F16.tensor_type(C::Vector), G::F32);
        assert_eq!(Recipe::F32.tensor_type(C::Tid2Eid), G::I32);
    }
}
