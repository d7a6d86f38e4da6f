//! The `warren` binary: argument parsing and output only; the work lives in the library.

mod cli;

fn main() -> std::process::ExitCode {
    cli::main()
}
