use clap::Parser;

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let cli = meshctl::commands::Cli::parse();
    if let Err(e) = meshctl::commands::run(cli).await {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}
