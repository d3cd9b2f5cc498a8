//! `moerunner check`: random cases over the whole support matrix against the float64 reference,
//! run in parallel, summarised per weight × activation format; every failure prints its seed.

use std::collections::BTreeMap;

use anyhow::{bail, Context};
use indicatif::{ProgressBar, ProgressStyle};
use moerunner::parallel::Transport;
use moerunner::random_cases::{case_seed, run_case_on, run_case_whole, Case, CaseResult};
use moerunner::{BackendChoice, Runner};
use rayon::prelude::*;

#[derive(clap::Args)]
pub struct Args {
    /// Number of random cases.
    #[arg(long, default_value_t = 2000)]
    cases: u64,
    /// Base seed of the run (case i gets its own seed derived from it).
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Backend under test: auto, cpu, cuda or reference.
    #[arg(long, default_value = "auto")]
    backend: String,
    /// Run the single case with this seed (as printed by a failing run) and show its details.
    #[arg(long, value_name = "SEED")]
    case: Option<u64>,
    /// How a case split over EP/TP ranks runs: `none` — each rank alone on its slice, outputs
    /// summed on the host (what one rank of a deployment computes); `thread` — the whole layer
    /// over its ranks as threads of this process with real collectives (tokens split between
    /// ranks; all-to-all or all-gather + reduce-scatter, alternating by seed, for EP, TP and TEP),
    /// as `run --ep/--tp` does; `nccl` — the same through NCCL, one rank per GPU (a case whose
    /// layout has more ranks than this machine has GPUs is skipped and counted; an unsplit case
    /// runs as one NCCL rank, so one GPU still checks the NCCL path); `device` — every rank on
    /// GPU 0, exchanging through device-to-device copies. `nccl` and `device` run the CUDA
    /// backend.
    #[arg(long, default_value = "none", value_parser = ["none", "thread", "nccl", "device"])]
    comm: String,
    /// With --comm: the EP mode of every case without TP (the rest keep their seed's mode):
    /// all-to-all, gather-scatter or device-all-to-all (--comm nccl or device; unsplit cases then
    /// run it too, as one rank). Default: alternating by seed.
    #[arg(long, requires = "comm")]
    ep_mode: Option<moerunner::parallel::EpMode>,
}

/// How a case runs over ranks: the transport, and the EP mode of cases without TP (None: by seed).
#[derive(Clone, Copy)]
struct Split {
    transport: Transport,
    ep_mode: Option<moerunner::parallel::EpMode>,
}

/// One case on `backend`: its ranks alone (partial sums), or the whole layer over `transport`'s
/// ranks (an unsplit case directly, except through NCCL: as one NCCL rank).
fn check_case(
    runner: &Runner,
    seed: u64,
    backend: &BackendChoice,
    split: Option<Split>,
) -> CaseResult {
    use moerunner::parallel::{self, EpMode, ExpertMap, Layout};
    let Some(Split { transport, ep_mode }) = split else {
        return run_case_on(runner, seed, backend);
    };
    run_case_whole(seed, |case, layer, input| {
        let ranks = case.ep_size * case.tp_size;
        let chosen = ep_mode.filter(|_| case.tp_size == 1);
        if ranks == 1 && transport != Transport::Nccl && chosen != Some(EpMode::DeviceAllToAll) {
            return runner.load(layer, backend)?.forward(input);
        }
        let mode = chosen.unwrap_or(if seed.is_multiple_of(2) {
            EpMode::GatherScatter
        } else {
            EpMode::AllToAll
        });
        let map = ExpertMap::even(case.config.num_experts, case.ep_size)?;
        let layout = Layout::new(map, case.tp_size, mode)?;
        parallel::forward_split(
            &layer,
            &layout,
            (backend, transport),
            input,
            std::time::Duration::from_secs(120),
        )
    })
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let mut backend: BackendChoice = args.backend.parse()?;
    let transport = match args.comm.as_str() {
        "none" => None,
        comm => Some(comm.parse::<Transport>()?),
    };
    super::check_ep_mode(args.ep_mode, transport)?;
    let split = transport.map(|transport| Split {
        transport,
        ep_mode: args.ep_mode,
    });
    // NCCL and device ranks run on GPUs: say at once what is missing (the `cuda` feature, a
    // driver, a GPU, libnccl), and how many ranks fit (NCCL: one per GPU).
    let most_ranks = match transport {
        Some(t) if t != Transport::Threads => {
            if !matches!(args.backend.as_str(), "auto" | "cuda") {
                bail!("--comm {t} runs GPU ranks: use --backend cuda (or auto)");
            }
            backend = BackendChoice::Named("cuda".into());
            t.max_ranks().with_context(|| format!("--comm {t}"))?
        }
        _ => usize::MAX,
    };
    if backend == BackendChoice::Named("reference".into()) {
        bail!(
            "--backend reference: check compares a backend with the float64 reference, so this \
             would check the reference against itself; name cpu or cuda (or auto)"
        );
    }
    let runner = Runner::new();
    // A backend that cannot run here says why, instead of every case counting as "skipped".
    runner.available(&backend)?;
    if let Some(seed) = args.case {
        return run_single_case(&runner, seed, &backend, split);
    }

    let bar = ProgressBar::new(args.cases);
    bar.set_style(
        ProgressStyle::with_template(
            "{bar:40} {pos}/{len} cases, {elapsed} elapsed, eta {eta} {msg}",
        )
        .context("progress bar template")?,
    );
    // A backend that covers part of the matrix (cuda) is checked on that part; the rest is counted.
    let skipped = std::sync::atomic::AtomicU64::new(0);
    // Cases whose layout has more ranks than the transport holds here (NCCL: GPUs), by rank count.
    let too_many_ranks = std::sync::Mutex::new(BTreeMap::<usize, u64>::new());
    let one = |i| {
        let seed = case_seed(args.seed, i);
        let case = Case::generate(seed);
        if runner.supports(&backend, &case.config).is_err() {
            skipped.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            bar.inc(1);
            return None;
        }
        let ranks = case.ep_size * case.tp_size;
        if ranks > most_ranks {
            if let Ok(mut m) = too_many_ranks.lock() {
                *m.entry(ranks).or_default() += 1;
            }
            bar.inc(1);
            return None;
        }
        let r = check_case(&runner, seed, &backend, split);
        if !r.passed {
            bar.set_message("(failures)");
        }
        bar.inc(1);
        Some(r)
    };
    // Thread ranks block their rayon worker while they wait for each other and run the CPU
    // backend's rayon work themselves: cases one after another (a rayon worker blocked on them
    // would starve the pool they need).
    let results: Vec<CaseResult> = if transport.is_some() {
        (0..args.cases).filter_map(one).collect()
    } else {
        (0..args.cases).into_par_iter().filter_map(one).collect()
    };
    bar.finish_and_clear();
    let skipped = skipped.into_inner();
    if skipped > 0 {
        println!(
            "{skipped} cases skipped: outside what backend {} supports",
            args.backend
        );
    }
    let too_many = too_many_ranks.into_inner().unwrap_or_default();
    if !too_many.is_empty() {
        let by_ranks: Vec<String> = too_many
            .iter()
            .map(|(r, n)| format!("{n} of {r} ranks"))
            .collect();
        println!(
            "{} split cases skipped: --comm {} puts one rank on each GPU and this machine has \
             {most_ranks} ({}); `--comm device` runs them all on one GPU",
            too_many.values().sum::<u64>(),
            args.comm,
            by_ranks.join(", ")
        );
    }
    if results.is_empty() {
        bail!(
            "no case ran: backend {} supports none of the {} drawn",
            args.backend,
            args.cases
        );
    }

    print_format_summary(&results);
    let failed: Vec<&CaseResult> = results.iter().filter(|r| !r.passed).collect();
    for r in &failed {
        println!(
            "FAIL seed={} rel_err={:.3e} tol={:.0e}  {}",
            r.seed, r.rel_err, r.tolerance, r.description
        );
        if let Some(e) = &r.error {
            println!("     error: {e}");
        }
    }
    if !failed.is_empty() {
        bail!(
            "{} of {} cases failed (rerun one with `moerunner check --case SEED --backend {}`)",
            failed.len(),
            results.len(),
            args.backend
        );
    }
    println!(
        "all {} cases passed (backend {}, seed {}, ranks: {}{})",
        results.len(),
        args.backend,
        args.seed,
        match transport {
            None => "partial sums",
            Some(Transport::Threads) => "threads with collectives",
            Some(Transport::Nccl) => "NCCL ranks, one per GPU",
            Some(Transport::Device) => "ranks sharing GPU 0 through device copies",
            // Not among `--comm`'s values here: processes are `run`'s (`--comm process`).
            Some(Transport::Processes | Transport::NcclProcesses) => "process ranks",
        },
        match args.ep_mode {
            Some(mode) => format!(", EP mode {mode:?} where there is no TP"),
            None => String::new(),
        }
    );
    Ok(())
}

fn run_single_case(
    runner: &Runner,
    seed: u64,
    backend: &BackendChoice,
    split: Option<Split>,
) -> anyhow::Result<()> {
    let case = Case::generate(seed);
    println!("case {seed}: {case}");
    let r = check_case(runner, seed, backend, split);
    match &r.error {
        Some(e) => println!("error: {e}"),
        None => println!(
            "rel_err {:.3e} (tolerance {:.0e}): {}",
            r.rel_err,
            r.tolerance,
            if r.passed { "pass" } else { "FAIL" }
        ),
    }
    if !r.passed {
        bail!("case {seed} failed");
    }
    Ok(())
}

/// Per weight × activation format: cases, passed, worst relative error, tolerance.
fn print_format_summary(results: &[CaseResult]) {
    #[derive(Default)]
    struct Row {
        cases: usize,
        passed: usize,
        worst: f64,
        tol: f64,
    }
    let mut rows: BTreeMap<(usize, usize), (String, Row)> = BTreeMap::new();
    for r in results {
        // Order rows like the spec's tables (enum order), not alphabetically.
        let key = (r.weight_format as usize, r.activation_format as usize);
        let (_, row) = rows.entry(key).or_insert_with(|| {
            (
                format!("{} × {}", r.weight_format, r.activation_format),
                Row::default(),
            )
        });
        row.cases += 1;
        row.passed += r.passed as usize;
        row.tol = r.tolerance;
        // An error counts as ∞ and a NaN sticks, so a row with either cannot look clean.
        let err = if r.error.is_some() {
            f64::INFINITY
        } else {
            r.rel_err
        };
        row.worst = if err.is_nan() || row.worst.is_nan() {
            f64::NAN
        } else {
            row.worst.max(err)
        };
    }
    println!(
        "{:<28} {:>6} {:>6} {:>12} {:>10}",
        "weight × activation", "cases", "passed", "worst err", "tolerance"
    );
    for (name, row) in rows.values() {
        println!(
            "{name:<28} {:>6} {:>6} {:>12.3e} {:>10.0e}",
            row.cases, row.passed, row.worst, row.tol
        );
    }
}
