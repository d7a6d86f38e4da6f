//! `warren new`: write a handler project skeleton in one of the guest languages.
//!
//! Each language is a list of template files under `host/templates/<lang>/`, embedded in the
//! binary. A language joins by adding its files there, a `Lang` variant and a match arm in
//! [`template`].

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context as _, ensure};
use clap::{Args, ValueEnum};

use super::usage_error;

/// Create a new handler project: a working `echo` and `hello` method and its build command.
///
/// The project refers to the Warren guest SDK (`guest-sdk/` of a Warren checkout) by absolute
/// path, so it builds offline. By default that is the checkout this `warren` was built from;
/// `--sdk-path` points elsewhere.
#[derive(Args)]
#[command(after_help = "Examples:\n  warren new --lang rust greeter\n  \
warren new --lang c greeter handlers/greeter\n  \
warren new --lang assemblyscript greeter --sdk-path ~/src/warren/guest-sdk")]
pub struct NewArgs {
    /// The handler's language.
    #[arg(long, value_enum)]
    lang: Lang,
    /// The handler's name: lowercase letters, digits, `-` and `_`, starting with a letter.
    name: String,
    /// The directory to create (default: ./NAME). It must not exist, or be empty.
    dir: Option<PathBuf>,
    /// The Warren guest SDK directory (`guest-sdk/` of a Warren checkout).
    #[arg(long)]
    sdk_path: Option<PathBuf>,
}

/// The guest languages `warren new` knows.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Lang {
    Rust,
    C,
    Assemblyscript,
    Python,
    Javascript,
}

/// One file of a template: its path in the new project and its text with `{{…}}` placeholders.
type File = (&'static str, &'static str);

macro_rules! templates {
    ($lang:literal: $($path:literal => $file:literal),* $(,)?) => {
        &[$(($path, include_str!(concat!("../../templates/", $lang, "/", $file)))),*]
    };
}

const RUST: &[File] = templates!("rust":
    "Cargo.toml" => "Cargo.toml.tmpl",
    "src/lib.rs" => "src/lib.rs.tmpl",
    "README.md" => "README.md.tmpl",
    ".gitignore" => "gitignore.tmpl",
    ".cargo/config.toml" => "cargo-config.toml.tmpl",
);

const C: &[File] = templates!("c":
    "{{name}}.c" => "handler.c.tmpl",
    "Makefile" => "Makefile.tmpl",
    "README.md" => "README.md.tmpl",
    ".gitignore" => "gitignore.tmpl",
);

const ASSEMBLYSCRIPT: &[File] = templates!("assemblyscript":
    "package.json" => "package.json.tmpl",
    "asconfig.json" => "asconfig.json.tmpl",
    "assembly/index.ts" => "assembly/index.ts.tmpl",
    "README.md" => "README.md.tmpl",
    ".gitignore" => "gitignore.tmpl",
);

const PYTHON: &[File] = templates!("python":
    "app.py" => "app.py.tmpl",
    "requirements.txt" => "requirements.txt.tmpl",
    "README.md" => "README.md.tmpl",
    ".gitignore" => "gitignore.tmpl",
);

const JAVASCRIPT: &[File] = templates!("javascript":
    "{{name}}.js" => "handler.js.tmpl",
    "build.mjs" => "build.mjs.tmpl",
    "package.json" => "package.json.tmpl",
    "README.md" => "README.md.tmpl",
    ".gitignore" => "gitignore.tmpl",
);

/// The AssemblyScript compiler version a new project pins (the one `plugins/hello-as` uses).
const ASSEMBLYSCRIPT_VERSION: &str = "0.28.20";

/// A language's files, and the file inside the SDK directory that proves it is the right one.
fn template(lang: Lang) -> anyhow::Result<(&'static [File], &'static str)> {
    match lang {
        Lang::Rust => Ok((RUST, "Cargo.toml")),
        Lang::C => Ok((C, "c/warren.h")),
        Lang::Assemblyscript => Ok((ASSEMBLYSCRIPT, "assemblyscript/package.json")),
        Lang::Python => Ok((PYTHON, "wit/warren.wit")),
        Lang::Javascript => Ok((JAVASCRIPT, "wit/warren.wit")),
    }
}

/// `warren new`.
pub fn new(args: NewArgs) -> ExitCode {
    match create(&args) {
        Ok((dir, files)) => {
            println!("created {} ({} files):", dir.display(), files.len());
            for f in files {
                println!("  {f}");
            }
            println!("see {}/README.md to build and run it", dir.display());
            ExitCode::SUCCESS
        }
        Err(e) => usage_error(e),
    }
}

fn create(args: &NewArgs) -> anyhow::Result<(PathBuf, Vec<String>)> {
    check_name(&args.name)?;
    let (files, marker) = template(args.lang)?;
    let sdk = sdk_dir(args.sdk_path.as_deref(), marker)?;
    let sdk_text = sdk
        .to_str()
        .with_context(|| format!("the SDK path {} is not UTF-8", sdk.display()))?;
    let dir = args
        .dir
        .clone()
        .unwrap_or_else(|| PathBuf::from(&args.name));
    if dir.exists() {
        let empty = std::fs::read_dir(&dir)
            .with_context(|| format!("cannot read {}", dir.display()))?
            .next()
            .is_none();
        ensure!(empty, "{} already exists and is not empty", dir.display());
    }
    let vars = [
        ("{{name}}", args.name.clone()),
        ("{{crate_name}}", args.name.replace('-', "_")),
        ("{{sdk}}", sdk_text.to_owned()),
        (
            "{{assemblyscript_version}}",
            ASSEMBLYSCRIPT_VERSION.to_owned(),
        ),
    ];
    let fill = |text: &str| {
        vars.iter()
            .fold(text.to_owned(), |t, (key, value)| t.replace(key, value))
    };
    let mut written = Vec::with_capacity(files.len());
    for &(path, text) in files {
        let rel = fill(path);
        let target = dir.join(&rel);
        if let Some(parent) = target.parent() {
            std::fs::create_dir_all(parent)
                .with_context(|| format!("cannot create {}", parent.display()))?;
        }
        std::fs::write(&target, fill(text))
            .with_context(|| format!("cannot write {}", target.display()))?;
        written.push(rel);
    }
    Ok((dir, written))
}

/// Names end up as crate, package, file and topic names: keep them boring.
fn check_name(name: &str) -> anyhow::Result<()> {
    let ok = name.len() <= 64
        && name.starts_with(|c: char| c.is_ascii_lowercase())
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '_');
    ensure!(
        ok,
        "invalid name {name:?}: use lowercase letters, digits, '-' and '_', starting with a \
         letter (at most 64 characters)"
    );
    Ok(())
}

/// The guest SDK directory, absolute: `--sdk-path`, else the checkout this binary was built
/// from. It must hold `marker`.
fn sdk_dir(given: Option<&Path>, marker: &str) -> anyhow::Result<PathBuf> {
    let dir = match given {
        Some(dir) => dir.to_owned(),
        None => Path::new(env!("CARGO_MANIFEST_DIR")).join("../guest-sdk"),
    };
    let hint = if given.is_some() {
        "check --sdk-path"
    } else {
        "this warren was built elsewhere: pass --sdk-path <warren checkout>/guest-sdk"
    };
    let dir = dir
        .canonicalize()
        .with_context(|| format!("the guest SDK {} is missing ({hint})", dir.display()))?;
    ensure!(
        dir.join(marker).is_file(),
        "{} is not the Warren guest SDK: it has no {marker} ({hint})",
        dir.display()
    );
    Ok(dir)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_checked() {
        for good in ["echo", "my-handler", "h_2"] {
            assert!(check_name(good).is_ok(), "{good}");
        }
        for bad in ["", "Echo", "2x", "a b", "../x", "x/y", &"a".repeat(65)] {
            assert!(check_name(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn every_placeholder_is_known() {
        for lang in [
            Lang::Rust,
            Lang::C,
            Lang::Assemblyscript,
            Lang::Python,
            Lang::Javascript,
        ] {
            let (files, _) = template(lang).expect("template");
            for (path, text) in files {
                for piece in text.split("{{").skip(1).chain(path.split("{{").skip(1)) {
                    let key = piece.split("}}").next().unwrap_or_default();
                    assert!(
                        ["name", "crate_name", "sdk", "assemblyscript_version"].contains(&key),
                        "{lang:?} {path}: unknown placeholder {{{{{key}}}}}"
                    );
                }
            }
        }
    }

    #[test]
    fn assemblyscript_version_matches_hello_as() {
        let package = include_str!("../../../plugins/hello-as/package.json");
        let pin = format!("\"assemblyscript\": \"{ASSEMBLYSCRIPT_VERSION}\"");
        assert!(
            package.contains(&pin),
            "plugins/hello-as pins another version"
        );
    }

    #[test]
    fn component_templates_pin_what_the_examples_use() {
        let py = include_str!("../../../plugins/hello-py/requirements.txt");
        let (files, _) = template(Lang::Python).expect("python");
        let pin = files
            .iter()
            .find(|(path, _)| *path == "requirements.txt")
            .map(|(_, text)| text.trim())
            .unwrap_or_default();
        assert!(
            py.contains(pin),
            "plugins/hello-py pins another componentize-py: {pin}"
        );
        let js = include_str!("../../../plugins/hello-js/package.json");
        assert!(js.contains("\"@bytecodealliance/componentize-js\": \"0.23.0\""));
        let (files, _) = template(Lang::Javascript).expect("javascript");
        assert!(files.iter().any(|(_, text)| text
            .contains("\"@bytecodealliance/componentize-js\": \"0.23.0\"")));
    }
}
