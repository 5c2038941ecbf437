//! `octet chat`: an interactive conversation on stdin/stdout. Each input line is a user turn;
//! the reply streams to stdout followed by a newline. The KV cache is kept across turns, so a
//! turn computes only its own tokens. `/reset` forgets the conversation (the system turn
//! stays), `/exit` or end of input ends it. Timings go to stderr.
use super::generate::{ChatArgs, SamplingArgs, Streamer};
use anyhow::Context;
use octet::chat::{ChatSession, ChatTemplate};
use octet::tokenizer::Tokenizer;
use std::io::{BufRead, IsTerminal, Write};

/// Flags.
#[derive(clap::Args, Debug)]
pub struct Args {
    #[command(flatten)]
    source: super::ModelArgs,
    #[command(flatten)]
    conversation: ChatArgs,
    #[command(flatten)]
    sampling: SamplingArgs,
}

pub fn run(mut a: Args) -> anyhow::Result<()> {
    a.source.model = octet::hub::resolve_model(&a.source.model)?;
    let load = a.source.load_options()?;
    octet::model::check_model_path(&a.source.model)?;
    let tok = Tokenizer::from_dir(&a.source.model)?;
    let template = ChatTemplate::load(
        &a.source.model,
        a.conversation.chat_template.as_deref(),
        tok.clone(),
    )?;
    let m = a.source.load_model(&load)?;
    let model = m.model.as_ref();
    let opts = a
        .sampling
        .options(&a.source.model, model, &tok, template.end_of_turn_id()?)?;
    let mut session = ChatSession::new(
        model,
        &template,
        a.conversation.system.as_deref(),
        opts.use_cache,
    );
    let stdin = std::io::stdin();
    let interactive = stdin.is_terminal();
    let mut out = std::io::stdout().lock();
    let mut lines = stdin.lock().lines();
    loop {
        if interactive {
            eprint!("> ");
        }
        let Some(line) = lines.next() else { break };
        let line = line.context("reading stdin")?;
        let user = line.trim_end_matches('\r');
        match user.trim() {
            "" => continue,
            "/exit" | "/quit" => break,
            "/reset" => {
                session.reset();
                eprintln!("(conversation cleared)");
                continue;
            }
            _ => {}
        }
        let mut stream = Streamer::new(&tok, &[], &[], &opts.eos, &mut out);
        let reply = session.say(user, &opts, |t| stream.push(t));
        let stats = stream.finish()?;
        let reply = reply?;
        out.write_all(b"\n")?;
        out.flush()?;
        if reply.dropped_messages > 0 {
            eprintln!(
                "note: the {} oldest messages were dropped to fit the model's {} positions",
                reply.dropped_messages,
                model.info().max_positions
            );
        }
        eprint!(
            "({} of {} prompt tokens reused from the cache)",
            reply.reused_tokens, reply.prompt_tokens
        );
        stats.report(reply.prompt_tokens, &opts, reply.ended_turn, "end of turn");
    }
    Ok(())
}
