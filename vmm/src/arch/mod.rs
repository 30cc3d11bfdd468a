//! Architecture support. chapeau is x86_64 only.

pub mod x86_64;
