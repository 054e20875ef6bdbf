//! ds4-model
