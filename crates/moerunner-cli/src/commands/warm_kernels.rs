//! `moerunner warm-kernels`: compile every kernel module a GPU of one architecture may load into
//! the kernel cache ahead of time, in parallel (`moerunner::backend::cuda::nvrtc::warm_cache`).
//! A layer's first call then reads its kernels instead of compiling them one by one — at deploy
//! time (an image built without a GPU), or before a benchmark or test run on a fresh machine.

/// `warm-kernels`' flags (the command's help is on its variant in main.rs).
#[derive(clap::Args)]
pub struct Args {
    /// Architecture to compile for (sm_90a: Hopper, all modules; sm_100a: Blackwell, all but the
    /// wgmma main loops). Default: the first GPU's, else sm_90a.
    #[arg(long)]
    pub arch: Option<String>,
    /// Only the modules whose name contains this text (e.g. `combine`, `MXFP4`).
    #[arg(long)]
    pub only: Option<String>,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    gpu::run(args)
}

#[cfg(feature = "cuda")]
mod gpu {
    use std::time::Instant;

    use moerunner::backend::cuda::{device::Device, kernels, nvrtc};

    pub fn run(args: super::Args) -> anyhow::Result<()> {
        let arch = match args.arch {
            Some(a) if a.starts_with("sm_") => a,
            Some(a) => {
                anyhow::bail!("--arch `{a}`: expected an architecture like sm_90a or sm_100a")
            }
            None => match Device::open(0) {
                Ok(dev) => dev.arch.clone(),
                Err(why) => {
                    eprintln!(
                        "note: no GPU here ({why}): compiling for {}",
                        kernels::WGMMA_ARCH
                    );
                    kernels::WGMMA_ARCH.to_string()
                }
            },
        };
        let keys: Vec<_> = kernels::ModuleKey::all_for(&arch)
            .into_iter()
            .filter(|k| {
                args.only
                    .as_ref()
                    .is_none_or(|o| k.label().contains(o.as_str()))
            })
            .collect();
        if keys.is_empty() {
            anyhow::bail!(
                "--only `{}` names no kernel module",
                args.only.unwrap_or_default()
            );
        }
        let started = Instant::now();
        let warmed = nvrtc::warm_cache(&keys, &arch)?;
        println!(
            "{} modules for {arch} in {}: {} compiled, {} already cached, {} failed ({:.1} s on {} threads)",
            warmed.modules,
            warmed.dir.display(),
            warmed.compiled,
            warmed.cached,
            warmed.failed.len(),
            started.elapsed().as_secs_f64(),
            rayon::current_num_threads()
        );
        if !warmed.failed.is_empty() {
            anyhow::bail!(
                "{} kernel modules did not compile for {arch}:\n{}",
                warmed.failed.len(),
                warmed.failed.join("\n")
            );
        }
        Ok(())
    }
}

#[cfg(not(feature = "cuda"))]
mod gpu {
    pub fn run(_: super::Args) -> anyhow::Result<()> {
        anyhow::bail!("this build has no CUDA backend (built without the `cuda` feature)")
    }
}
