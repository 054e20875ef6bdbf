//! ds4-convert
