//! In-process tests of the migration engine (filled below).
