//! ds4-cuda
