//! ds4-server
