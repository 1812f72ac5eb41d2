//! meshctl: the Trellis CLI. Each command lives in its own module; [`client`] is the only place
//! that speaks HTTP.

pub mod analyze;
pub mod bootstrap;
pub mod client;
pub mod cluster;
pub mod commands;
pub mod describe;
pub mod inspect;
pub mod lab;
pub mod output;
