//! Warren example plugin for capabilities: it can only see the directories and environment
//! variables its `[[handler]]` grants (`dirs`, `env`); everything else fails like a missing file.

use serde::Deserialize;
use warren_guest::Error;

#[derive(Deserialize)]
struct Path {
    path: String,
}

#[derive(Deserialize)]
struct Write {
    path: String,
    text: String,
}

#[derive(Deserialize)]
struct Var {
    name: String,
}

fn io_error(what: &str, path: &str, e: std::io::Error) -> Error {
    Error::new("IOError", format!("cannot {what} {path}: {e}"))
}

fn read(args: Path) -> Result<String, Error> {
    std::fs::read_to_string(&args.path).map_err(|e| io_error("read", &args.path, e))
}

fn write(args: Write) -> Result<usize, Error> {
    std::fs::write(&args.path, &args.text).map_err(|e| io_error("write", &args.path, e))?;
    Ok(args.text.len())
}

fn env(args: Var) -> Result<String, Error> {
    std::env::var(&args.name)
        .map_err(|_| Error::new("KeyError", format!("{} is not set", args.name)))
}

warren_guest::export!(read, write, env);
