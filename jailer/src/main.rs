//! `ember-jailer` binary: see the `jailer` library.

use jailer::args::{self, Command};
use jailer::{sanitize, Config, Error};

fn fail(e: Error) -> ! {
    eprintln!("ember-jailer: {e}");
    std::process::exit(e.exit_code())
}

fn main() {
    // First thing: no inherited descriptors, no inherited environment.
    if let Err(e) = sanitize::close_inherited_fds() {
        fail(e.into());
    }
    sanitize::clear_env();

    let args = match args::parse(std::env::args_os().skip(1)) {
        Ok(Command::Run(a)) => *a,
        Ok(Command::Help) => {
            print!("{}", args::USAGE);
            return;
        }
        Ok(Command::Version) => {
            println!("ember-jailer {}", env!("CARGO_PKG_VERSION"));
            return;
        }
        Err(e) => fail(e.into()),
    };
    let cfg = match Config::from_args(args) {
        Ok(c) => c,
        Err(e) => fail(e),
    };
    match jailer::run(&cfg) {
        Ok(never) => match never {},
        Err(e) => fail(e),
    }
}
