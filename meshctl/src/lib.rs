//! meshctl: the Trellis CLI. Each command lives in its own module; [`client`] is the only place
//! that speaks HTTP.

pub mod client;
pub mod commands;
pub mod lab;
pub mod output;
