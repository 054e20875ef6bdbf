//! Weight-streaming matrix-vector kernels (decode) for every weight type: owned by the "gemv"
//! engineer. See kernels/gemv.cu.
