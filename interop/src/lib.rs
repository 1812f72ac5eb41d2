//! Interop tests live in `tests/`; the peers they drive (grpcio and grpc-js-xds programs) are in
//! `grpc/`, with their dependencies installed from PyPI and npm by `make test`.
