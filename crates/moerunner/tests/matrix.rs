//! The seeded random matrix (`moerunner::random_cases`) through the cpu backend, and checks of the
//! checker itself: it passes the reference against itself and catches deliberately wrong outputs.
//! Every case prints its seed; rerun one alone with `moerunner check --case SEED --backend cpu`.

use moerunner::forward::ForwardOutput;
use moerunner::random_cases::{case_seed, run_case_on, run_case_with, Case, CaseResult};
use moerunner::tensor::HostTensor;
use moerunner::{BackendChoice, MoeError, MoeLayer, Runner, W13Order};
use rayon::prelude::*;

const MATRIX_SEED: u64 = 0x4D6F_4552; // "MoER"
const MATRIX_CASES: u64 = 300;

fn run_matrix(runner: &Runner, backend: &BackendChoice, base: u64, cases: u64) -> Vec<CaseResult> {
    let results: Vec<CaseResult> = (0..cases)
        .into_par_iter()
        .map(|i| run_case_on(runner, case_seed(base, i), backend))
        .collect();
    for r in &results {
        let verdict = if r.passed { "ok  " } else { "FAIL" };
        println!(
            "{verdict} seed={:<20} err={:.2e} tol={:.0e} {}{}",
            r.seed,
            r.rel_err,
            r.tolerance,
            r.description,
            r.error
                .as_ref()
                .map(|e| format!(" error: {e}"))
                .unwrap_or_default()
        );
    }
    results
}

fn assert_all_pass(results: &[CaseResult], what: &str) {
    let failed: Vec<String> = results
        .iter()
        .filter(|r| !r.passed)
        .map(|r| format!("seed {} ({})", r.seed, r.description))
        .collect();
    assert!(
        failed.is_empty(),
        "{what}: {} of {} cases failed:\n{}",
        failed.len(),
        results.len(),
        failed.join("\n")
    );
}

#[test]
fn matrix_through_the_cpu_backend() {
    let runner = Runner::new();
    let results = run_matrix(
        &runner,
        &BackendChoice::Named("cpu".into()),
        MATRIX_SEED,
        MATRIX_CASES,
    );
    assert_all_pass(&results, "cpu backend");
}

#[test]
fn the_reference_backend_passes_against_the_reference() {
    // Its only differences are the final rounding to the output dtype (and the f32 partial sums
    // under EP/TP), far inside every tolerance.
    let runner = Runner::new();
    let results = run_matrix(
        &runner,
        &BackendChoice::Named("reference".into()),
        MATRIX_SEED ^ 1,
        60,
    );
    assert_all_pass(&results, "reference backend");
}

#[test]
fn the_matrix_covers_the_whole_support_matrix() {
    // Over the default run's first 2000 seeds every legal format pair, routing method, activation,
    // order, routing input and parallel split appears; a generator change that drops one fails here.
    let cases: Vec<Case> = (0..2000).map(|i| Case::generate(case_seed(1, i))).collect();
    for wf in moerunner::WeightFormat::ALL {
        for af in wf.legal_activation_formats() {
            assert!(
                cases
                    .iter()
                    .any(|c| c.config.weight_format == *wf && c.config.activation_format == *af),
                "{wf} x {af} missing"
            );
        }
    }
    for m in moerunner::RoutingMethod::ALL {
        assert!(
            cases.iter().any(|c| c.config.routing.method == *m),
            "{m} missing"
        );
    }
    assert!(cases.iter().any(
        |c| c.config.routing.method == moerunner::RoutingMethod::DeepseekV3
            && c.config.routing.n_group > 1
    ));
    assert!(cases.iter().any(
        |c| c.config.routing.method == moerunner::RoutingMethod::DeepseekV3
            && c.config.routing.n_group <= 1
    ));
    for o in W13Order::ALL {
        assert!(
            cases
                .iter()
                .any(|c| c.config.activation.is_gated() && c.config.w13_order == *o),
            "{o} missing"
        );
    }
    for kind in ["swiglu", "geglu", "swiglu_oai", "relu2"] {
        assert!(
            cases
                .iter()
                .any(|c| c.config.activation.kind().name() == kind),
            "{kind} missing"
        );
    }
    assert!(
        cases.iter().any(|c| c.tokens == 0)
            && cases.iter().any(|c| c.tokens == 1)
            && cases.iter().any(|c| c.tokens >= 200)
    );
    assert!(cases.iter().any(|c| c.padding) && cases.iter().any(|c| c.biases));
    assert!(cases.iter().any(|c| c.ep_size > 1 && c.tp_size > 1));
    assert!(cases.iter().any(|c| c.config.hidden == 352));
    // Seeds alone reproduce a case.
    assert_eq!(
        Case::generate(12345).to_string(),
        Case::generate(12345).to_string()
    );
}

/// Runs `layer` on the reference backend and lets `damage` change its output values.
fn damaged(
    layer: MoeLayer,
    input: &moerunner::ForwardInput<'_>,
    damage: fn(&mut [f32]),
) -> moerunner::Result<ForwardOutput> {
    let mut out = Runner::new()
        .load(layer, &BackendChoice::Named("reference".into()))?
        .forward(input)?;
    let mut v = out.output.to_f32_vec("output")?;
    damage(&mut v);
    out.output = HostTensor::encode_f32(out.output.dtype, out.output.shape.clone(), &v);
    Ok(out)
}

/// Seeds of single-device cases with tokens and a gated activation (so a swapped W13 order is wrong).
fn interesting_seeds(n: usize) -> Vec<u64> {
    (0..)
        .map(|i| case_seed(0xBAD, i))
        .filter(|&s| {
            let c = Case::generate(s);
            c.tokens >= 2
                && c.ep_size == 1
                && c.tp_size == 1
                && c.config.activation.is_gated()
                && !c.padding
        })
        .take(n)
        .collect()
}

#[test]
fn the_checker_catches_wrong_outputs() {
    for seed in interesting_seeds(12) {
        let good = run_case_with(seed, |layer, input| damaged(layer, input, |_| {}));
        assert!(
            good.passed,
            "seed {seed}: the undamaged reference must pass: {good:?}"
        );

        // Every output a few tolerances too large.
        let scaled = run_case_with(seed, |layer, input| {
            damaged(layer, input, |v| v.iter_mut().for_each(|x| *x *= 1.2))
        });
        assert!(
            !scaled.passed && scaled.rel_err > 0.1,
            "seed {seed}: scaled output passed: {scaled:?}"
        );

        // One NaN.
        let nan = run_case_with(seed, |layer, input| {
            damaged(layer, input, |v| v[v.len() / 2] = f32::NAN)
        });
        assert!(
            !nan.passed && nan.rel_err.is_nan(),
            "seed {seed}: NaN passed: {nan:?}"
        );

        // All zeros (a backend that computed nothing).
        let zero = run_case_with(seed, |layer, input| damaged(layer, input, |v| v.fill(0.0)));
        assert!(!zero.passed, "seed {seed}: zero output passed: {zero:?}");

        // A wrong index: gate and up rows read in the wrong order.
        let swapped = run_case_with(seed, |layer, input| {
            let (mut cfg, weights) = layer.into_parts();
            cfg.w13_order = match cfg.w13_order {
                W13Order::GateUp => W13Order::UpGate,
                _ => W13Order::GateUp,
            };
            damaged(MoeLayer::new(cfg, weights)?, input, |_| {})
        });
        assert!(
            !swapped.passed,
            "seed {seed}: swapped gate/up passed: {swapped:?}"
        );

        // A backend error is a failure that carries the reason.
        let failing = run_case_with(seed, |_, _| {
            Err(MoeError::Unsupported("broken on purpose".into()))
        });
        assert!(
            !failing.passed
                && failing
                    .error
                    .as_deref()
                    .is_some_and(|e| e.contains("broken on purpose"))
        );
    }
}

#[test]
fn an_all_zero_reference_needs_an_all_zero_output() {
    use moerunner::random_cases::relative_error;
    assert_eq!(relative_error(&[0.0, 0.0], &[0.0, 0.0]), 0.0);
    assert_eq!(relative_error(&[0.0, 1e-30], &[0.0, 0.0]), f64::INFINITY);
    assert!(relative_error(&[f64::NAN, 1.0], &[1.0, 1.0]).is_nan());
    assert!(
        (relative_error(&[3.0, 4.0], &[3.0, 4.5]) - 0.5 / (3f64 * 3.0 + 4.5 * 4.5).sqrt()).abs()
            < 1e-15
    );
}

/// The matrix's split cases (EP and/or TP ranks) as `moerunner check --comm thread` runs them: the
/// whole layer over its ranks as threads with real collectives (`parallel::forward_threads`: tokens
/// split between ranks, all-to-all and all-gather + reduce-scatter by seed parity, for EP, TP and
/// TEP), against the same oracle as the partial sums (`random_cases::run_case_whole`).
#[test]
fn split_cases_through_thread_collectives() {
    use moerunner::parallel::{self, EpMode, ExpertMap, Layout};
    use moerunner::random_cases::run_case_whole;
    let cpu = BackendChoice::Named("cpu".into());
    let (mut split, mut modes) = (0, [0usize; 2]);
    for i in 0..400 {
        let seed = case_seed(MATRIX_SEED ^ 0xC0, i);
        let case = Case::generate(seed);
        if case.ep_size * case.tp_size == 1 {
            continue;
        }
        split += 1;
        let mode = if seed.is_multiple_of(2) {
            EpMode::GatherScatter
        } else {
            EpMode::AllToAll
        };
        modes[usize::from(mode == EpMode::AllToAll)] += 1;
        let r = run_case_whole(seed, |case, layer, input| {
            let map = ExpertMap::even(case.config.num_experts, case.ep_size)?;
            let layout = Layout::new(map, case.tp_size, mode)?;
            parallel::forward_threads(
                &layer,
                &layout,
                &cpu,
                input,
                std::time::Duration::from_secs(60),
            )
        });
        println!(
            "{} seed={seed} err={:.2e} {mode:?} {}{}",
            if r.passed { "ok  " } else { "FAIL" },
            r.rel_err,
            r.description,
            r.error
                .as_deref()
                .map(|e| format!(" error: {e}"))
                .unwrap_or_default()
        );
        assert!(r.passed, "seed {seed}: {r:?}");
    }
    println!(
        "{split} split cases: {} gather-scatter, {} all-to-all",
        modes[0], modes[1]
    );
    assert!(
        split >= 20 && modes[1] >= 5,
        "the seeds must exercise both EP modes"
    );
}
