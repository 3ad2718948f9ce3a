//! Ferry library.
