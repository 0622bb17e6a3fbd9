//! placeholder (helper overwrites)
