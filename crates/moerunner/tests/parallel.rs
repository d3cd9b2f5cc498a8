//! Parallel layouts on CPU ranks (threads, `ThreadComm`) against the single-device CPU result:
//! EP all-to-all (bitwise), EP gather-scatter, TP and TEP (within tolerance), R = 2, 3, 4; even,
//! uneven and replicated expert maps; experts no token picks, ranks that own or receive no
//! tokens, T = 0 and T = 1; and faults: a rank that fails stops every rank with an error naming
//! it, a rank that never arrives times the others out — no hang.

use std::time::{Duration, Instant};

use moerunner::config::tolerance;
use moerunner::parallel::{
    forward_rank, forward_threads, token_slice, Communicator, EpMode, ExpertMap, Layout, RankLayer,
    ThreadComm,
};
use moerunner::random_cases::relative_error;
use moerunner::synth::{self, RoutingMode, SynthInput};
use moerunner::{
    Activation, BackendChoice, DType, ForwardInput, ForwardOutput, HostTensor, LayerConfig,
    MoeError, MoeLayer, Parallelism, RoutingConfig, RoutingInput, RoutingMethod, Runner, W13Order,
    WeightFormat,
};

const TIMEOUT: Duration = Duration::from_secs(60);

fn cpu() -> BackendChoice {
    BackendChoice::Named("cpu".into())
}

fn config(
    weight: WeightFormat,
    experts: usize,
    inter: usize,
    routing: RoutingConfig,
) -> LayerConfig {
    LayerConfig {
        num_experts: experts,
        hidden: 64,
        intermediate: inter,
        weight_format: weight,
        activation_format: weight.legal_activation_formats()[0],
        activation: Activation::Swiglu,
        w13_order: W13Order::GateUp,
        routing,
        local_experts: 0..experts,
        parallelism: Parallelism::default(),
    }
}

fn layer(cfg: &LayerConfig, seed: u64) -> MoeLayer {
    synth::random_layer(cfg, seed, true).unwrap_or_else(|e| panic!("{cfg}: {e}"))
}

fn input(
    cfg: &LayerConfig,
    tokens: usize,
    seed: u64,
    mode: RoutingMode,
    dtype: DType,
) -> SynthInput {
    synth::random_input(cfg, tokens, mode, dtype, seed ^ 0xA11)
        .unwrap_or_else(|e| panic!("{cfg}: {e}"))
}

fn single(l: &MoeLayer, x: &SynthInput) -> ForwardOutput {
    let loaded = Runner::new()
        .load(l.clone(), &cpu())
        .expect("load whole layer");
    loaded
        .forward(&ForwardInput {
            hidden: &x.hidden,
            routing: x.routing_input(),
        })
        .expect("single-device forward")
}

fn parallel(l: &MoeLayer, x: &SynthInput, layout: &Layout) -> ForwardOutput {
    forward_threads(
        l,
        layout,
        &cpu(),
        &ForwardInput {
            hidden: &x.hidden,
            routing: x.routing_input(),
        },
        TIMEOUT,
    )
    .unwrap_or_else(|e| panic!("{} {layout:?}: {e}", l.config()))
}

fn f32s(t: &HostTensor) -> Vec<f64> {
    t.to_f32_vec("output")
        .expect("float output")
        .into_iter()
        .map(f64::from)
        .collect()
}

/// The parallel result equals the single-device one: bit for bit when `bitwise`, else within
/// `tol` relative error. Routes must be the same in both cases.
fn check(what: &str, l: &MoeLayer, x: &SynthInput, layout: &Layout, bitwise: bool, tol: f64) {
    let want = single(l, x);
    let got = parallel(l, x, layout);
    let case = format!("{what}: {} T={} {layout:?}", l.config(), x.hidden.shape[0]);
    assert_eq!(got.routes, want.routes, "{case}: routes differ");
    assert_eq!(got.output.shape, want.output.shape, "{case}");
    assert_eq!(got.output.dtype, want.output.dtype, "{case}");
    if bitwise {
        let (g, w) = (f32s(&got.output), f32s(&want.output));
        if let Some(i) = (0..g.len()).find(|&i| g[i].to_bits() != w[i].to_bits()) {
            panic!(
                "{case}: not bitwise equal at [{}, {}]: {} vs {}",
                i / 64,
                i % 64,
                g[i],
                w[i]
            );
        }
        assert_eq!(&got.output.bytes[..], &want.output.bytes[..], "{case}");
    } else {
        let err = relative_error(&f32s(&got.output), &f32s(&want.output));
        assert!(err <= tol, "{case}: relative error {err} over {tol}");
    }
}

fn renorm(k: usize) -> RoutingConfig {
    RoutingConfig::new(RoutingMethod::Renormalize, k)
}

/// Tokens routed (top-k, caller ids) only to experts `ids`, one expert per slot in turn.
fn routed_to(cfg: &LayerConfig, tokens: usize, ids: &[i32], seed: u64) -> SynthInput {
    let mut x = input(cfg, tokens, seed, RoutingMode::TopK, DType::F32);
    let k = cfg.routing.top_k;
    let v: Vec<i32> = (0..tokens * k)
        .map(|i| ids[(i / k + i % k) % ids.len()])
        .collect();
    x.topk_ids = Some(HostTensor::from_i32(vec![tokens, k], &v));
    x
}

#[test]
fn ep_all_to_all_is_bitwise_the_single_device_result() {
    for (i, &w) in WeightFormat::ALL.iter().enumerate() {
        let cfg = config(w, 8, 128, renorm(3));
        let l = layer(&cfg, 10 + i as u64);
        for ranks in [2, 3, 4] {
            let layout = Layout::even(8, ranks, 1, EpMode::AllToAll).expect("layout");
            for tokens in [0, 1, 5, 40] {
                let x = input(&cfg, tokens, tokens as u64, RoutingMode::Logits, DType::F32);
                check("ep a2a", &l, &x, &layout, true, 0.0);
            }
        }
    }
}

/// Seeded random cases of the whole matrix (`random_cases::Case`: formats, activations, W13
/// orders, biases, every routing method and input form, padding, dtypes, T): all-to-all EP is
/// bitwise the single-device output, gather-scatter within a few roundings of the output dtype.
#[test]
fn random_cases_split_over_ranks_match_one_device() {
    for i in 0..24 {
        let seed = moerunner::random_cases::case_seed(0x9A7A, i);
        let case = moerunner::random_cases::Case::generate(seed);
        let l = case.layer().unwrap_or_else(|e| panic!("seed {seed}: {e}"));
        let x = case.input().unwrap_or_else(|e| panic!("seed {seed}: {e}"));
        let e = case.config.num_experts;
        let ranks = 2 + (i as usize % 3);
        if e < ranks {
            continue;
        }
        let what = format!("seed {seed} ({case})");
        let a2a = Layout::even(e, ranks, 1, EpMode::AllToAll).expect("layout");
        check(&what, &l, &x, &a2a, true, 0.0);
        let gs = Layout::even(e, ranks, 1, EpMode::GatherScatter).expect("layout");
        let tol = if case.dtype == DType::F32 { 1e-6 } else { 1e-2 };
        check(&what, &l, &x, &gs, false, tol);
    }
}

#[test]
fn ep_all_to_all_keeps_routing_methods_dtypes_and_padding() {
    let mut ds = RoutingConfig::new(RoutingMethod::DeepseekV3, 4);
    (ds.n_group, ds.topk_group, ds.routed_scaling_factor) = (4, 2, 2.5);
    let cases = [
        (ds, RoutingMode::Logits, DType::F32),
        (
            RoutingConfig::new(RoutingMethod::Llama4, 1),
            RoutingMode::Logits,
            DType::F16,
        ),
        (renorm(2), RoutingMode::Packed, DType::BF16),
        (renorm(2), RoutingMode::TopK, DType::F32),
    ];
    for (i, (routing, mode, dtype)) in cases.into_iter().enumerate() {
        let cfg = config(WeightFormat::Mxfp4, 8, 64, routing);
        let l = layer(&cfg, 30 + i as u64);
        let mut x = input(&cfg, 23, i as u64, mode, dtype);
        if let Some(ids) = &mut x.topk_ids {
            // Padding slots (−1) travel nowhere and add nothing.
            let mut v = ids.to_i32_vec("ids").expect("ids");
            v.iter_mut().step_by(5).for_each(|id| *id = -1);
            *ids = HostTensor::from_i32(ids.shape.clone(), &v);
        }
        for ranks in [2, 4] {
            let layout = Layout::even(8, ranks, 1, EpMode::AllToAll).expect("layout");
            check("ep a2a routing", &l, &x, &layout, true, 0.0);
        }
    }
}

#[test]
fn ep_gather_scatter_matches_up_to_summation_order() {
    for (i, &w) in WeightFormat::ALL.iter().enumerate() {
        let cfg = config(w, 8, 128, renorm(3));
        let l = layer(&cfg, 50 + i as u64);
        for ranks in [2, 3, 4] {
            let layout = Layout::even(8, ranks, 1, EpMode::GatherScatter).expect("layout");
            for tokens in [0, 1, 17] {
                let x = input(&cfg, tokens, tokens as u64, RoutingMode::Logits, DType::F32);
                // Each slot's row is computed as on one device; only the f32 sum over slots is
                // grouped by rank, so the outputs differ by a few f32 roundings (measured ≤ 6e-8).
                check("ep gather", &l, &x, &layout, false, 1e-6);
            }
        }
    }
}

#[test]
fn unpicked_experts_and_ranks_without_tokens() {
    let cfg = config(WeightFormat::Bf16, 8, 64, renorm(2));
    let l = layer(&cfg, 70);
    // Only experts 0 and 1 are picked: every rank but rank 0 receives nothing to compute.
    let x = routed_to(&cfg, 9, &[0, 1], 1);
    for ranks in [2, 3, 4] {
        for mode in [EpMode::AllToAll, EpMode::GatherScatter] {
            let layout = Layout::even(8, ranks, 1, mode).expect("layout");
            check("no tokens", &l, &x, &layout, mode == EpMode::AllToAll, 1e-6);
        }
    }
}

#[test]
fn uneven_and_replicated_expert_maps() {
    let cfg = config(WeightFormat::Mxfp4, 8, 64, renorm(2));
    let l = layer(&cfg, 80);
    let x = input(&cfg, 31, 3, RoutingMode::Logits, DType::F32);
    // (map, ranks, bitwise in all-to-all): without replicas every expert's pairs meet on one
    // rank as on one device; with replicas an expert's pairs split over its holders.
    let maps = [
        ("0,0,0,0,0,1,1,2", 3, true),
        ("3,1,0,2,0,1,2,1", 4, true),
        ("0+1,0,1,1,0+1,0,0,1", 2, false),
        ("0+1+2,1,2,2,0,1+2,0,1", 3, false),
    ];
    for (spec, ranks, bitwise) in maps {
        let map = ExpertMap::parse(spec, 8, ranks).expect(spec);
        for mode in [EpMode::AllToAll, EpMode::GatherScatter] {
            let layout = Layout::new(map.clone(), 1, mode).expect("layout");
            let tol = tolerance(cfg.weight_format, cfg.activation_format);
            check(
                spec,
                &l,
                &x,
                &layout,
                bitwise && mode == EpMode::AllToAll,
                tol,
            );
        }
    }
}

#[test]
fn expert_maps_are_validated() {
    let bad = [
        ("0,1", 3, "has 2 entries"),
        ("0,0,4", 3, "rank 4"),
        ("0,0,0", 2, "rank 1 holds no expert"),
        ("0,1+1,2", 3, "listed twice"),
        ("0,x,1", 2, "not a rank"),
    ];
    for (spec, ranks, why) in bad {
        let err = ExpertMap::parse(spec, 3, ranks)
            .expect_err(spec)
            .to_string();
        assert!(err.contains(why), "{spec}: {err}");
    }
    let even = ExpertMap::even(7, 3).expect("even");
    assert_eq!(even.experts_of(0), &[0, 1, 2]);
    assert_eq!(even.experts_of(2), &[5, 6]);
    let rep = ExpertMap::parse("0+1,1", 2, 2).expect("replicas");
    assert_eq!(
        (0..4).map(|t| rep.rank_for(0, t)).collect::<Vec<_>>(),
        [Some(0), Some(1), Some(0), Some(1)]
    );
    assert_eq!(rep.rank_for(-1, 0), None);
}

#[test]
fn tensor_parallel_and_tep_match_within_tolerance() {
    for &w in WeightFormat::ALL {
        for (ep, tp) in [(1, 2), (1, 3), (1, 4), (2, 2)] {
            // Every rank's I slice starts on a scale block (128 for fp8_block, else 32).
            let block = if w == WeightFormat::Fp8Block { 128 } else { 32 };
            let cfg = config(w, 8, block * tp, renorm(2));
            let l = layer(&cfg, 90);
            // TP and TEP in both modes: gather-scatter, and all-to-all dispatch to every TP rank
            // of the expert's group with partial rows summed in TP-rank order.
            for mode in [EpMode::GatherScatter, EpMode::AllToAll] {
                let layout = Layout::even(8, ep, tp, mode).expect("layout");
                for tokens in [0, 1, 13] {
                    let x = input(&cfg, tokens, tokens as u64, RoutingMode::Logits, DType::F32);
                    // The intermediate is requantized per I slice and GEMM2's sum over I is split.
                    check(
                        &format!("tp {mode:?}"),
                        &l,
                        &x,
                        &layout,
                        false,
                        tolerance(w, cfg.activation_format),
                    );
                }
            }
        }
    }
}

/// TEP all-to-all and TEP gather-scatter compute the same sums in different orders: within a few
/// f32 roundings of each other (bf16 weights, f32 output).
#[test]
fn tep_all_to_all_agrees_with_tep_gather_scatter() {
    let cfg = config(WeightFormat::Bf16, 8, 64, renorm(2));
    let l = layer(&cfg, 91);
    let x = input(&cfg, 17, 5, RoutingMode::Logits, DType::F32);
    let run = |mode| {
        let layout = Layout::even(8, 2, 2, mode).expect("layout");
        let fwd = ForwardInput {
            hidden: &x.hidden,
            routing: x.routing_input(),
        };
        forward_threads(&l, &layout, &cpu(), &fwd, TIMEOUT)
            .expect("forward")
            .output
            .to_f32_vec("out")
            .expect("f32")
    };
    let (a, g) = (run(EpMode::AllToAll), run(EpMode::GatherScatter));
    let err = relative_error(
        &a.iter().map(|&v| v as f64).collect::<Vec<_>>(),
        &g.iter().map(|&v| v as f64).collect::<Vec<_>>(),
    );
    assert!(err < 1e-6, "TEP a2a vs gather-scatter: {err}");
}

/// Loads every rank of `layout` and runs `input(rank)` on each at once; each rank's result and
/// the time the slowest took.
fn run_ranks(
    l: &MoeLayer,
    layout: &Layout,
    timeout: Duration,
    input: impl Fn(usize) -> Option<(HostTensor, HostTensor)> + Sync,
) -> (Vec<Result<ForwardOutput, MoeError>>, Duration) {
    let comms = ThreadComm::group(layout.ranks(), timeout).expect("group");
    let runner = Runner::new();
    let started = Instant::now();
    let results = std::thread::scope(|s| {
        let hs: Vec<_> = comms
            .into_iter()
            .enumerate()
            .map(|(r, comm)| {
                let (runner, input) = (&runner, &input);
                s.spawn(move || {
                    let layer = RankLayer::load(l, layout, r, runner, &cpu())?;
                    // `None`: this rank never joins (a peer that died without a word).
                    let Some((hidden, logits)) = input(r) else {
                        return Err(MoeError::invalid("test", "rank left"));
                    };
                    forward_rank(
                        &comm,
                        &layer,
                        &ForwardInput {
                            hidden: &hidden,
                            routing: RoutingInput::Logits(&logits),
                        },
                    )
                })
            })
            .collect();
        hs.into_iter()
            .map(|h| h.join().expect("rank thread"))
            .collect()
    });
    (results, started.elapsed())
}

fn rank_input(
    cfg: &LayerConfig,
    x: &SynthInput,
    tokens: usize,
    ranks: usize,
    r: usize,
) -> (HostTensor, HostTensor) {
    let s = token_slice(tokens, ranks, r);
    let (h, e) = (cfg.hidden, cfg.num_experts);
    let hid = x.hidden.to_f32_vec("h").expect("h");
    let lg = x
        .router_logits
        .as_ref()
        .expect("logits")
        .to_f32_vec("l")
        .expect("l");
    (
        HostTensor::from_f32(vec![s.len(), h], &hid[s.start * h..s.end * h]),
        HostTensor::from_f32(vec![s.len(), e], &lg[s.start * e..s.end * e]),
    )
}

#[test]
fn a_failing_rank_stops_every_rank_naming_it() {
    let cfg = config(WeightFormat::Bf16, 8, 64, renorm(2));
    let l = layer(&cfg, 100);
    let x = input(&cfg, 12, 1, RoutingMode::Logits, DType::F32);
    for ranks in [2, 3, 4] {
        for mode in [EpMode::AllToAll, EpMode::GatherScatter] {
            let layout = Layout::even(8, ranks, 1, mode).expect("layout");
            let (results, took) = run_ranks(&l, &layout, TIMEOUT, |r| {
                let (mut hidden, logits) = rank_input(&cfg, &x, 12, ranks, r);
                if r == 1 {
                    // Bad input on rank 1 only: a NaN in its hidden states.
                    let mut v = hidden.to_f32_vec("h").expect("h");
                    v[3] = f32::NAN;
                    hidden = HostTensor::from_f32(hidden.shape.clone(), &v);
                }
                Some((hidden, logits))
            });
            assert!(
                took < Duration::from_secs(10),
                "took {took:?}: waited instead of stopping"
            );
            for (r, res) in results.iter().enumerate() {
                let err = res
                    .as_ref()
                    .err()
                    .unwrap_or_else(|| panic!("rank {r} of {ranks} succeeded"))
                    .to_string();
                assert!(
                    err.contains("rank 1") && err.contains("not a finite number"),
                    "rank {r}: {err}"
                );
                assert!(err.starts_with(&format!("rank {r}:")), "rank {r}: {err}");
            }
        }
    }
}

#[test]
fn a_rank_that_panics_stops_the_others_at_once() {
    for ranks in [2, 3] {
        let comms = ThreadComm::group(ranks, TIMEOUT).expect("group");
        let started = Instant::now();
        let results: Vec<_> = std::thread::scope(|s| {
            let hs: Vec<_> = comms
                .into_iter()
                .map(|c| {
                    s.spawn(move || {
                        if c.rank() == ranks - 1 {
                            panic!("planted panic on the last rank");
                        }
                        c.barrier()
                    })
                })
                .collect();
            hs.into_iter().map(|h| h.join()).collect()
        });
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "waited for the timeout"
        );
        for (r, res) in results.iter().enumerate().take(ranks - 1) {
            let err = res
                .as_ref()
                .expect("no panic")
                .as_ref()
                .expect_err("stopped")
                .to_string();
            assert!(
                err.contains(&format!("rank {} panicked", ranks - 1)),
                "rank {r}: {err}"
            );
        }
        assert!(results[ranks - 1].is_err(), "the last rank panicked");
    }
}

#[test]
fn a_rank_that_never_arrives_times_the_others_out() {
    let cfg = config(WeightFormat::Bf16, 8, 64, renorm(2));
    let l = layer(&cfg, 101);
    let x = input(&cfg, 6, 1, RoutingMode::Logits, DType::F32);
    let layout = Layout::even(8, 3, 1, EpMode::AllToAll).expect("layout");
    let timeout = Duration::from_millis(300);
    let (results, took) = run_ranks(&l, &layout, timeout, |r| {
        (r != 2).then(|| rank_input(&cfg, &x, 6, 3, r))
    });
    assert!(took < Duration::from_secs(10), "took {took:?}");
    for res in &results[..2] {
        let err = res.as_ref().expect_err("stopped").to_string();
        assert!(err.contains("timed out") && err.contains("[2]"), "{err}");
    }
}

#[test]
fn collectives_sum_in_rank_order_and_exchange_exactly() {
    for ranks in [1, 2, 3, 4] {
        let comms = ThreadComm::group(ranks, TIMEOUT).expect("group");
        let out: Vec<_> = std::thread::scope(|s| {
            let hs: Vec<_> = comms
                .iter()
                .map(|c| {
                    s.spawn(move || {
                        let r = c.rank();
                        let data: Vec<f32> = (0..ranks * 2)
                            .map(|i| (r * 100 + i) as f32 + 0.25)
                            .collect();
                        let sum = c.all_reduce_sum(&data)?;
                        let part = c.reduce_scatter_sum(&data, &vec![2; ranks])?;
                        let send = (0..ranks).map(|d| vec![r as u8; d + r]).collect();
                        let got = c.all_to_all_v(send)?;
                        c.barrier()?;
                        Ok::<_, MoeError>((sum, part, got))
                    })
                })
                .collect();
            hs.into_iter()
                .map(|h| h.join().expect("thread").expect("collectives"))
                .collect()
        });
        for (r, (sum, part, got)) in out.into_iter().enumerate() {
            let want = |i: usize| (0..ranks).fold(0.0f32, |a, s| a + ((s * 100 + i) as f32 + 0.25));
            assert_eq!(sum, (0..ranks * 2).map(want).collect::<Vec<_>>());
            assert_eq!(part, vec![want(2 * r), want(2 * r + 1)]);
            for (s, b) in got.iter().enumerate() {
                assert_eq!(b, &vec![s as u8; r + s]);
            }
        }
    }
}

/// The GPU transports say what they lack instead of panicking: without the `cuda` feature, a
/// driver or a GPU, `max_ranks` and a split over them fail naming it; where they can run, NCCL
/// holds one rank per GPU and device ranks any number.
#[test]
fn gpu_transports_name_what_they_lack() {
    use moerunner::parallel::{forward_split, Transport};
    let cfg = config(WeightFormat::Bf16, 4, 64, renorm(2));
    let l = layer(&cfg, 3);
    let x = input(&cfg, 5, 7, RoutingMode::Logits, DType::F32);
    let layout = Layout::even(4, 2, 1, EpMode::AllToAll).expect("layout");
    for t in [Transport::Nccl, Transport::Device] {
        assert_eq!(t.to_string().parse::<Transport>().expect("name"), t);
        match t.max_ranks() {
            Ok(n) => {
                if n == usize::MAX {
                    println!("{t}: any number of ranks here");
                } else {
                    println!("{t}: up to {n} ranks here");
                }
                assert!(n >= 1);
            }
            Err(e) => {
                let why = e.to_string();
                println!("{t}: {why}");
                assert!(
                    ["`cuda` feature", "libcuda", "no GPU", "libnccl"]
                        .iter()
                        .any(|w| why.contains(w)),
                    "{t}: {why}"
                );
                let run = forward_split(
                    &l,
                    &layout,
                    (&BackendChoice::Named("cuda".into()), t),
                    &ForwardInput {
                        hidden: &x.hidden,
                        routing: x.routing_input(),
                    },
                    TIMEOUT,
                );
                let err = run.expect_err("no split without what it lacks").to_string();
                assert!(err.contains("cuda") || err.contains("GPU"), "{t}: {err}");
            }
        }
    }
    assert_eq!(Transport::Threads.max_ranks().expect("threads"), usize::MAX);
    assert!("carrier-pigeon".parse::<Transport>().is_err());
}

/// Device all-to-all (`EpMode::DeviceAllToAll`) runs only where its pieces are: a layout with TP or
/// more ranks than its 32-bit destination masks is refused when made, and ranks that compute on the
/// CPU, or talk through host memory, are refused when called — each naming why, never a panic.
#[test]
fn device_all_to_all_says_where_it_cannot_run() {
    use moerunner::parallel::{forward_split, ExpertMap, Transport};
    for name in ["device-all-to-all", "device-a2a"] {
        assert_eq!(
            name.parse::<EpMode>().expect("mode"),
            EpMode::DeviceAllToAll
        );
    }
    let err = Layout::even(8, 2, 2, EpMode::DeviceAllToAll)
        .expect_err("TP")
        .to_string();
    assert!(
        err.contains("device-all-to-all") && err.contains("TP 2"),
        "{err}"
    );
    let err = Layout::new(
        ExpertMap::even(64, 33).expect("map"),
        1,
        EpMode::DeviceAllToAll,
    )
    .expect_err("33 ranks")
    .to_string();
    assert!(err.contains("at most 32"), "{err}");

    let cfg = config(WeightFormat::Bf16, 8, 64, renorm(2));
    let l = layer(&cfg, 41);
    let x = input(&cfg, 6, 1, RoutingMode::Logits, DType::BF16);
    let layout = Layout::even(8, 2, 1, EpMode::DeviceAllToAll).expect("layout");
    let err = forward_split(
        &l,
        &layout,
        (&BackendChoice::Named("cpu".into()), Transport::Threads),
        &ForwardInput {
            hidden: &x.hidden,
            routing: x.routing_input(),
        },
        TIMEOUT,
    )
    .expect_err("CPU ranks")
    .to_string();
    // (a build without the `cuda` feature has no device path at all, and says so)
    let why = if cfg!(feature = "cuda") {
        err.contains("device entry") && err.contains("`cpu`")
    } else {
        err.contains("`cuda` feature")
    };
    assert!(why, "{err}");
}
