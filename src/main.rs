//! The `octet` command line.
mod cli;

use clap::Parser;

fn main() {
    let args = cli::Cli::parse();
    if let Err(err) = cli::run(args) {
        eprintln!("error: {}", chain_message(&err));
        std::process::exit(1);
    }
}

/// The error and its causes joined by ": ", each said once: library errors already quote
/// their source in their own message (`path: No such file (os error 2)`), and printing the
/// chain in full would repeat it.
fn chain_message(err: &anyhow::Error) -> String {
    let mut msg = String::new();
    for cause in err.chain() {
        let text = cause.to_string();
        if msg.contains(&text) {
            continue;
        }
        if !msg.is_empty() {
            msg.push_str(": ");
        }
        msg.push_str(&text);
    }
    msg
}
