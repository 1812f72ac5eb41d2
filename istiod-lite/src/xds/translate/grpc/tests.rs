//! Table tests of the gRPC translation live here (added with the translation's test suite).
