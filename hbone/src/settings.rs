//! HTTP/2 settings for HBONE connections (PROTOCOLS.md).

/// Per-stream flow-control window.
pub const STREAM_WINDOW: u32 = 4 << 20;
/// Connection flow-control window.
pub const CONNECTION_WINDOW: u32 = 16 << 20;
pub const MAX_FRAME_SIZE: u32 = 1 << 20;
pub const MAX_HEADER_LIST_SIZE: u32 = 16 << 10;
/// Streams per pooled connection.
pub const MAX_STREAMS: u32 = 100;

/// `connection_window` is [`CONNECTION_WINDOW`] unless a [`crate::window`] budget granted less.
pub fn client(connection_window: u32) -> h2::client::Builder {
    let mut b = h2::client::Builder::new();
    b.initial_window_size(STREAM_WINDOW)
        .initial_connection_window_size(connection_window)
        .max_frame_size(MAX_FRAME_SIZE)
        .max_header_list_size(MAX_HEADER_LIST_SIZE)
        .enable_push(false);
    b
}

/// `connection_window` is [`CONNECTION_WINDOW`] unless a [`crate::window`] budget granted less.
pub fn server(connection_window: u32) -> h2::server::Builder {
    let mut b = h2::server::Builder::new();
    b.initial_window_size(STREAM_WINDOW)
        .initial_connection_window_size(connection_window)
        .max_frame_size(MAX_FRAME_SIZE)
        .max_header_list_size(MAX_HEADER_LIST_SIZE)
        .max_concurrent_streams(MAX_STREAMS);
    b
}
