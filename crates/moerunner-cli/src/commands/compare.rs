//! `moerunner compare A B`: relative error, max abs error, NaN count and top-k agreement of two
//! output files, B taken as the reference.

use std::path::PathBuf;

use anyhow::bail;

#[derive(clap::Args)]
pub struct Args {
    /// The output file to judge (`run --output`).
    a: PathBuf,
    /// The reference output file (e.g. `run --reference`).
    b: PathBuf,
    /// Exit with status 1 when the relative error exceeds this, or when A or B holds a NaN/inf.
    #[arg(long)]
    tolerance: Option<f64>,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let c = moerunner::layer_file::compare_outputs(&args.a, &args.b)?;
    println!(
        "{} vs {} (reference): T = {}, H = {}",
        args.a.display(),
        args.b.display(),
        c.tokens,
        c.hidden
    );
    println!("  relative error  {:.3e}  (‖A − B‖₂ / ‖B‖₂)", c.rel_err);
    println!(
        "  max abs error   {:.3e}  (token {}, column {})",
        c.max_abs, c.max_abs_at.0, c.max_abs_at.1
    );
    println!(
        "  NaN/inf         {} in A, {} in B",
        c.non_finite.0, c.non_finite.1
    );
    match &c.topk {
        Some(t) => println!(
            "  top-k agree     {}/{} tokens, {}/{} ids (k = {})",
            t.tokens_same,
            c.tokens,
            t.ids_shared,
            c.tokens * t.top_k,
            t.top_k
        ),
        None => println!("  top-k agree     n/a (save both with `run --save-routing`)"),
    }
    if let Some(tol) = args.tolerance {
        if c.non_finite != (0, 0) {
            bail!("A or B holds NaN or inf values");
        }
        if c.rel_err.is_nan() || c.rel_err > tol {
            bail!(
                "relative error {:.3e} is over --tolerance {tol:e}",
                c.rel_err
            );
        }
        println!("  within --tolerance {tol:e}");
    }
    Ok(())
}
