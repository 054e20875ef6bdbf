//! ds4-kvstore
