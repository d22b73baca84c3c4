//! `ember-snapshot-editor`: offline edits of ember-vmm snapshot files.
//!
//! ```text
//! ember-snapshot-editor edit-memory rebase --memory-path BASE --diff-path DIFF
//! ```
//!
//! lays the pages of a Diff snapshot's memory file onto its base's memory
//! file, in place (Firecracker's `snapshot-editor edit-memory rebase`). The
//! base then loads with the Diff's state file. See `vmm/src/snapshot/rebase.rs`
//! for the checks made on both files.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[path = "../snapshot/extents.rs"]
mod extents;
#[path = "../snapshot/rebase.rs"]
mod rebase;

#[derive(Parser)]
#[command(
    name = "ember-snapshot-editor",
    version,
    about = "Offline edits of ember-vmm snapshot files"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Edits of a snapshot's memory file.
    #[command(name = "edit-memory")]
    EditMemory {
        #[command(subcommand)]
        op: MemoryOp,
    },
}

#[derive(Subcommand)]
enum MemoryOp {
    /// Writes a Diff memory file's pages onto its base memory file, in place.
    Rebase {
        /// The base (Full, or already rebased) memory file; changed in place.
        #[arg(long)]
        memory_path: PathBuf,
        /// The Diff memory file taken after the base.
        #[arg(long)]
        diff_path: PathBuf,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.cmd {
        Cmd::EditMemory {
            op:
                MemoryOp::Rebase {
                    memory_path,
                    diff_path,
                },
        } => match rebase::rebase(&memory_path, &diff_path) {
            Ok(st) => {
                println!(
                    "rebased {} bytes in {} extents of {} onto {}",
                    st.bytes,
                    st.extents,
                    diff_path.display(),
                    memory_path.display()
                );
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("ember-snapshot-editor: {e}");
                ExitCode::FAILURE
            }
        },
    }
}
