use std::io::Read;

use serde_json::json;

/// CNI contract: the result or the error JSON on stdout; exit status 0 or 1.
fn main() {
    let mut stdin = Vec::new();
    let outcome = trellis_cni::env::parse(|k| std::env::var(k).ok()).and_then(|env| {
        std::io::stdin()
            .take(1 << 20)
            .read_to_end(&mut stdin)
            .map_err(|e| trellis_cni::error::io("reading the config from stdin", e))?;
        trellis_cni::run(&env, &stdin)
    });
    match outcome {
        Ok(Some(v)) => println!("{v}"),
        Ok(None) => {}
        Err(e) => {
            let version = serde_json::from_slice::<serde_json::Value>(&stdin)
                .ok()
                .and_then(|v| v.get("cniVersion").and_then(|x| x.as_str()).map(str::to_string))
                .unwrap_or_else(|| "1.1.0".into());
            let mut out = json!({"cniVersion": version, "code": e.code, "msg": e.msg});
            if !e.details.is_empty() {
                out["details"] = json!(e.details);
            }
            println!("{out}");
            std::process::exit(1);
        }
    }
}
