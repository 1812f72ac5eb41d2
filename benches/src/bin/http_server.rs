//! The backend for `make bench-l4`'s wrk runs: a small keep-alive HTTP/1.1 server on one thread,
//! answering every request with a short body. The same server sits behind the raw path and the
//! Trellis path, so the ratio measures only the proxy.

use axum::routing::get;
use axum::Router;

fn main() -> anyhow::Result<()> {
    let addr = std::env::args().nth(1).unwrap_or_else(|| "0.0.0.0:8080".into());
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    rt.block_on(async move {
        let app = Router::new().fallback(get(|| async { "hello from the bench backend\n" }));
        axum::serve(tokio::net::TcpListener::bind(&addr).await?, app).await?;
        anyhow::Ok(())
    })
}
