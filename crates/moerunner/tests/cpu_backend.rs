//! The CPU backend against the float64 reference: every weight × activation format, routing from
//! logits, top-k and packed top-k, every activation and W13 order, biases, Llama-4, expert-parallel
//! ranks, padding ids, T = 0 / 1 / moderate, every hidden dtype; bitwise determinism across thread
//! counts; the AVX2 kernels against the portable scalar ones.
//!
//! Every case prints its seed and description when it fails and can be rerun alone by building
//! the same `Case`. Shapes are small (the reference is float64 and single-threaded) but cross every
//! boundary the kernels have: K not a multiple of 16 or 128, token counts on both sides of the
//! in-register/sgemm switch, experts with no tokens.

use std::sync::Arc;

use moerunner::backend::cpu::{CpuLayer, Isa};
use moerunner::backend::LoadedLayer;
use moerunner::config::tolerance;
use moerunner::synth::{self, RoutingMode};
use moerunner::{
    Activation, ActivationFormat, DType, ForwardInput, HostTensor, LayerConfig, MoeLayer,
    Parallelism, RoutingConfig, RoutingInput, RoutingMethod, W13Order, WeightFormat,
};

#[derive(Clone, Debug)]
struct Case {
    seed: u64,
    experts: usize,
    top_k: usize,
    hidden: usize,
    inter: usize,
    weight: WeightFormat,
    act_format: ActivationFormat,
    activation: Activation,
    order: W13Order,
    routing: RoutingMethod,
    mode: RoutingMode,
    biases: bool,
    /// (rank, size) of an expert-parallel slice.
    ep: Option<(usize, usize)>,
    tokens: usize,
    dtype: DType,
    /// Replace this fraction of routed ids by −1 padding (top-k modes only).
    padding: bool,
}

impl Case {
    fn new(seed: u64, weight: WeightFormat, act_format: ActivationFormat) -> Case {
        Case {
            seed,
            experts: 8,
            top_k: 2,
            hidden: 128,
            inter: 64,
            weight,
            act_format,
            activation: Activation::Swiglu,
            order: W13Order::GateUp,
            routing: RoutingMethod::Renormalize,
            mode: RoutingMode::Logits,
            biases: false,
            ep: None,
            tokens: 5,
            dtype: DType::F32,
            padding: false,
        }
    }

    fn config(&self) -> LayerConfig {
        let mut routing = RoutingConfig::new(self.routing, self.top_k);
        if self.routing == RoutingMethod::DeepseekV3 {
            routing.n_group = 4;
            routing.topk_group = 2;
            routing.routed_scaling_factor = 2.5;
        }
        let (local, parallelism) = match self.ep {
            None => (0..self.experts, Parallelism::default()),
            Some((rank, size)) => {
                let per = self.experts / size;
                (
                    rank * per..(rank + 1) * per,
                    Parallelism {
                        ep_size: size,
                        ep_rank: rank,
                        tp_size: 1,
                        tp_rank: 0,
                    },
                )
            }
        };
        LayerConfig {
            num_experts: self.experts,
            hidden: self.hidden,
            intermediate: self.inter,
            weight_format: self.weight,
            activation_format: self.act_format,
            activation: self.activation,
            w13_order: self.order,
            routing,
            local_experts: local,
            parallelism,
        }
    }
}

/// A built case: the layer, the input and the routing tensors it refers to.
struct Built {
    layer: Arc<MoeLayer>,
    input: synth::SynthInput,
}

/// Multiplies every stored block scale by a power of two that depends on its index, so a kernel
/// reading the wrong scale (wrong expert, row block, column block) is off by a gross factor rather
/// than by the tiny differences between synthetic blocks of equal amplitude. The layer stays valid
/// and the reference reads the same scales.
fn vary_scales(layer: MoeLayer) -> MoeLayer {
    fn vary(t: &mut moerunner::QuantizedTensor) {
        match &mut t.scales {
            moerunner::BlockScales::None => {}
            moerunner::BlockScales::PerExpert(s) | moerunner::BlockScales::Block128(s) => {
                for (i, v) in s.iter_mut().enumerate() {
                    *v *= [1.0, 4.0, 0.5, 2.0, 0.25][i % 5];
                }
            }
            // UE8M0: +1 is ×2 (codes stay far below 255).
            moerunner::BlockScales::Ue8m0(s) => {
                for (i, b) in s.iter_mut().enumerate() {
                    *b = b.saturating_add([0, 2, 1, 3][i % 4]).min(254);
                }
            }
            // E4M3 (positive): +8 is one exponent step while the code stays below NaN (0x7F).
            moerunner::BlockScales::E4m3(s) => {
                for (i, b) in s.iter_mut().enumerate() {
                    let bumped = *b + 8 * [0, 2, 1][i % 3];
                    if bumped < 0x7F {
                        *b = bumped;
                    }
                }
            }
        }
    }
    let (config, mut w) = layer.into_parts();
    vary(&mut w.w13);
    vary(&mut w.w2);
    MoeLayer::new(config, w).unwrap_or_else(|e| panic!("varied scales: {e}"))
}

fn build(case: &Case) -> Built {
    let config = case.config();
    let layer = synth::random_layer(&config, case.seed, case.biases)
        .unwrap_or_else(|e| panic!("{case:?}: layer: {e}"));
    let layer = vary_scales(layer);
    let mut input = synth::random_input(&config, case.tokens, case.mode, case.dtype, case.seed + 1)
        .unwrap_or_else(|e| panic!("{case:?}: input: {e}"));
    if case.padding {
        // Every third slot becomes padding (−1), in whichever top-k form the input carries.
        if let Some(ids) = &input.topk_ids {
            let mut v = ids.to_i32_vec("ids").unwrap();
            v.iter_mut().step_by(3).for_each(|id| *id = -1);
            input.topk_ids = Some(HostTensor::from_i32(ids.shape.clone(), &v));
        }
        if let Some(packed) = &input.topk_packed {
            let mut v = packed.to_i32_vec("packed").unwrap();
            v.iter_mut()
                .step_by(3)
                .for_each(|p| *p = moerunner::routing::pack(-1, 0.5));
            input.topk_packed = Some(HostTensor::from_i32(packed.shape.clone(), &v));
        }
    }
    Built {
        layer: Arc::new(layer),
        input,
    }
}

fn forward(
    layer: &CpuLayer,
    input: &synth::SynthInput,
) -> (Vec<f32>, moerunner::Routes, HostTensor) {
    let fwd = ForwardInput {
        hidden: &input.hidden,
        routing: input.routing_input(),
    };
    let out = layer
        .forward(&fwd)
        .unwrap_or_else(|e| panic!("cpu forward: {e}"));
    let values = out.output.to_f32_vec("output").unwrap();
    (values, out.routes, out.output)
}

/// ‖a − b‖₂ / ‖b‖₂, failing on any non-finite value with its coordinate.
fn rel_err(what: &str, out: &[f32], reference: &[f64], h: usize) -> f64 {
    assert_eq!(out.len(), reference.len(), "{what}: output length");
    if let Some(i) = out.iter().position(|v| !v.is_finite()) {
        panic!("{what}: output [{}, {}] is {}", i / h, i % h, out[i]);
    }
    let (mut d, mut n) = (0f64, 0f64);
    for (&o, &r) in out.iter().zip(reference) {
        d += (o as f64 - r) * (o as f64 - r);
        n += r * r;
    }
    if n == 0.0 {
        return d.sqrt();
    }
    (d / n).sqrt()
}

/// Runs `case` on the CPU backend with `isa` and checks it against the reference.
fn check_with(case: &Case, isa: Isa) -> Vec<f32> {
    let b = build(case);
    let cpu = CpuLayer::new(b.layer.clone(), isa);
    let (out, routes, tensor) = forward(&cpu, &b.input);
    assert_eq!(tensor.dtype, case.dtype, "{case:?}: output dtype");
    assert_eq!(
        tensor.shape,
        vec![case.tokens, case.hidden],
        "{case:?}: output shape"
    );
    let x = b.input.hidden.to_f32_vec("hidden").unwrap();
    let reference = moerunner::reference::forward(&b.layer, &x, &routes)
        .unwrap_or_else(|e| panic!("{case:?}: reference: {e}"));
    let err = rel_err(&format!("{case:?}"), &out, &reference, case.hidden);
    let tol = tolerance(case.weight, case.act_format);
    assert!(
        err <= tol,
        "seed {} {isa:?}: rel err {err:.3e} > {tol:.0e} for {case:?}",
        case.seed
    );
    out
}

fn check(case: &Case) -> Vec<f32> {
    check_with(case, Isa::detect())
}

fn pairs() -> Vec<(WeightFormat, ActivationFormat)> {
    WeightFormat::ALL
        .iter()
        .flat_map(|&w| w.legal_activation_formats().iter().map(move |&a| (w, a)))
        .collect()
}

#[test]
fn every_format_pairing_matches_the_reference() {
    for (i, (w, a)) in pairs().into_iter().enumerate() {
        let seed = 100 + i as u64;
        check(&Case::new(seed, w, a));
        // Enough tokens that every expert takes the decode + sgemm path (> 8 pairs each).
        check(&Case {
            tokens: 48,
            ..Case::new(seed + 50, w, a)
        });
    }
}

#[test]
fn k_not_a_multiple_of_the_chunk_or_block() {
    // H = 200: fp8_block's last 128-block is partial, bf16/fp8 rows end in an 8-element tail.
    for w in [
        WeightFormat::Bf16,
        WeightFormat::Fp8,
        WeightFormat::Fp8Block,
    ] {
        let a = w.default_activation_format();
        check(&Case {
            hidden: 200,
            inter: 72,
            ..Case::new(7, w, a)
        });
        check(&Case {
            hidden: 200,
            inter: 72,
            tokens: 40,
            ..Case::new(8, w, a)
        });
    }
    // nvfp4 only needs K % 16: I = 48 is three 16-blocks, not a multiple of 32.
    check(&Case {
        hidden: 144,
        inter: 48,
        ..Case::new(9, WeightFormat::Nvfp4, ActivationFormat::Nvfp4PerToken)
    });
}

#[test]
fn activations_orders_and_biases() {
    let acts = [
        Activation::Swiglu,
        Activation::Geglu,
        Activation::OAI_DEFAULT,
        Activation::Relu2,
    ];
    let mut seed = 200;
    for act in acts {
        for order in [W13Order::GateUp, W13Order::UpGate, W13Order::Interleaved] {
            if !act.is_gated() && order != W13Order::GateUp {
                continue;
            }
            for (w, a) in [
                (WeightFormat::Bf16, ActivationFormat::Bf16),
                (WeightFormat::Mxfp4, ActivationFormat::Mxfp8),
            ] {
                seed += 1;
                check(&Case {
                    activation: act,
                    order,
                    biases: true,
                    tokens: 6,
                    ..Case::new(seed, w, a)
                });
            }
        }
    }
    check(&Case {
        activation: Activation::OAI_DEFAULT,
        order: W13Order::Interleaved,
        biases: true,
        tokens: 40,
        ..Case::new(250, WeightFormat::Mxfp4, ActivationFormat::Bf16)
    });
}

#[test]
fn routing_sources_and_methods() {
    let mut seed = 300;
    for mode in [RoutingMode::Logits, RoutingMode::TopK, RoutingMode::Packed] {
        for (w, a) in [
            (WeightFormat::Fp8Block, ActivationFormat::Fp8Block),
            (WeightFormat::Nvfp4, ActivationFormat::Nvfp4),
        ] {
            seed += 1;
            check(&Case {
                mode,
                tokens: 7,
                ..Case::new(seed, w, a)
            });
        }
    }
    for method in [
        RoutingMethod::Default,
        RoutingMethod::DeepseekV3,
        RoutingMethod::Minimax2,
        RoutingMethod::TopK,
        RoutingMethod::SigmoidRenorm,
    ] {
        seed += 1;
        check(&Case {
            routing: method,
            top_k: 3,
            tokens: 9,
            ..Case::new(seed, WeightFormat::Mxfp8, ActivationFormat::Mxfp8)
        });
    }
}

#[test]
fn llama4_weights_gemm1_input() {
    for (i, (w, a)) in [
        (WeightFormat::Bf16, ActivationFormat::Bf16),
        (WeightFormat::Fp8, ActivationFormat::Fp8),
    ]
    .into_iter()
    .enumerate()
    {
        check(&Case {
            routing: RoutingMethod::Llama4,
            top_k: 1,
            biases: true,
            tokens: 9,
            ..Case::new(400 + i as u64, w, a)
        });
        check(&Case {
            routing: RoutingMethod::Llama4,
            top_k: 1,
            biases: true,
            tokens: 80,
            ..Case::new(410 + i as u64, w, a)
        });
    }
}

#[test]
fn expert_parallel_rank_and_padding_ids() {
    for rank in 0..2 {
        for mode in [RoutingMode::TopK, RoutingMode::Packed] {
            let case = Case {
                ep: Some((rank, 2)),
                mode,
                padding: true,
                tokens: 24,
                biases: true,
                ..Case::new(
                    500 + rank as u64,
                    WeightFormat::Mxfp4,
                    ActivationFormat::Bf16,
                )
            };
            check(&case);
        }
        check(&Case {
            ep: Some((rank, 4)),
            tokens: 3,
            ..Case::new(
                520 + rank as u64,
                WeightFormat::Bf16,
                ActivationFormat::Bf16,
            )
        });
    }
}

#[test]
fn tokens_without_a_local_expert_get_zero_rows() {
    // Rank 1 of 2 holds experts 4..8; with k = 1 and random ids, some tokens route elsewhere.
    let case = Case {
        ep: Some((1, 2)),
        mode: RoutingMode::TopK,
        top_k: 1,
        tokens: 32,
        ..Case::new(600, WeightFormat::Fp8Block, ActivationFormat::Fp8Block)
    };
    let out = check(&case);
    let b = build(&case);
    let ids = b
        .input
        .topk_ids
        .as_ref()
        .unwrap()
        .to_i32_vec("ids")
        .unwrap();
    let foreign: Vec<usize> = (0..case.tokens).filter(|&t| ids[t] < 4).collect();
    assert!(
        !foreign.is_empty(),
        "the case must have tokens routed to the other rank"
    );
    for t in foreign {
        assert!(
            out[t * case.hidden..(t + 1) * case.hidden]
                .iter()
                .all(|&v| v == 0.0),
            "token {t} must be a zero row"
        );
    }
}

#[test]
fn zero_and_one_token() {
    let case = Case {
        tokens: 0,
        ..Case::new(700, WeightFormat::Bf16, ActivationFormat::Bf16)
    };
    let b = build(&case);
    let cpu = CpuLayer::new(b.layer.clone(), Isa::detect());
    let (out, _, tensor) = forward(&cpu, &b.input);
    assert!(out.is_empty());
    assert_eq!(tensor.shape, vec![0, case.hidden]);
    for (w, a) in pairs() {
        check(&Case {
            tokens: 1,
            ..Case::new(710, w, a)
        });
    }
}

/// Experts holding one token run E2M1 products in integers (activations in 16-bit fixed point
/// per 32-element block): every E2M1 pairing at T = 1 and T = 6 (most experts single), K with a
/// 16-element tail (H = 208, I = 80), biases and GPT-OSS's clamp; then a hidden state whose
/// blocks mix magnitudes 2^-12..2^12, the fixed point's worst case, against the reference and
/// against the f32 path (the scalar kernels).
#[test]
fn one_token_e2m1_products_in_integers() {
    let e2m1 = [
        (WeightFormat::Mxfp4, ActivationFormat::Bf16),
        (WeightFormat::Mxfp4, ActivationFormat::Mxfp8),
        (WeightFormat::Nvfp4, ActivationFormat::Nvfp4),
        (WeightFormat::Nvfp4, ActivationFormat::Nvfp4PerToken),
    ];
    for (i, (w, a)) in e2m1.into_iter().enumerate() {
        for tokens in [1, 6] {
            let seed = 1300 + 10 * i as u64 + tokens as u64;
            let (hidden, inter) = if w == WeightFormat::Nvfp4 {
                (208, 80)
            } else {
                (256, 96)
            };
            check(&Case {
                tokens,
                hidden,
                inter,
                biases: true,
                activation: Activation::SwigluOai {
                    alpha: 1.702,
                    beta: 1.0,
                    limit: 7.0,
                },
                ..Case::new(seed, w, a)
            });
        }
    }
    if !Isa::Avx2Fma.available() {
        eprintln!("the wide-range half skipped: this CPU has no AVX2+FMA");
        return;
    }
    let case = Case {
        tokens: 1,
        hidden: 256,
        dtype: DType::F32,
        ..Case::new(1350, WeightFormat::Mxfp4, ActivationFormat::Bf16)
    };
    let mut b = build(&case);
    let mut x = b.input.hidden.to_f32_vec("hidden").unwrap();
    for (i, v) in x.iter_mut().enumerate() {
        *v *= 2f32.powi((i * 7 % 25) as i32 - 12);
    }
    b.input.hidden = HostTensor::from_f32(vec![1, case.hidden], &x);
    let mut outs = Vec::new();
    for isa in [Isa::Avx2Fma, Isa::Scalar] {
        let cpu = CpuLayer::new(b.layer.clone(), isa);
        let (out, routes, _) = forward(&cpu, &b.input);
        let reference = moerunner::reference::forward(&b.layer, &x, &routes).unwrap();
        let err = rel_err("wide-range hidden", &out, &reference, case.hidden);
        eprintln!(
            "seed {} {isa:?}: wide-range hidden, rel err {err:.3e}",
            case.seed
        );
        assert!(
            err <= tolerance(case.weight, case.act_format),
            "{isa:?}: {err:.3e}"
        );
        outs.push(out);
    }
    let reference: Vec<f64> = outs[1].iter().map(|&v| f64::from(v)).collect();
    let diff = rel_err("integer vs f32 path", &outs[0], &reference, case.hidden);
    assert!(diff <= 1e-4, "integer and f32 paths differ by {diff:.3e}");
}

#[test]
fn hidden_dtypes_round_trip() {
    for (i, dtype) in [DType::F32, DType::BF16, DType::F16]
        .into_iter()
        .enumerate()
    {
        check(&Case {
            dtype,
            tokens: 6,
            ..Case::new(800 + i as u64, WeightFormat::Bf16, ActivationFormat::Bf16)
        });
        check(&Case {
            dtype,
            tokens: 6,
            ..Case::new(
                810 + i as u64,
                WeightFormat::Nvfp4,
                ActivationFormat::Nvfp4PerToken,
            )
        });
    }
}

#[test]
fn fp8_scales_too_large_to_fold_take_the_decoded_path() {
    // Per-tensor scales ≥ 2^8 cannot carry E4M3's 2^120 raw factor in f32; the backend must
    // decode such rows through the formats module and still match.
    for tokens in [3, 40] {
        let case = Case {
            tokens,
            ..Case::new(900, WeightFormat::Fp8, ActivationFormat::Fp8)
        };
        let b = build(&case);
        let (config, mut weights) = (*b.layer).clone().into_parts();
        if let moerunner::BlockScales::PerExpert(s) = &mut weights.w13.scales {
            s.iter_mut().for_each(|v| *v *= 4096.0);
        }
        let layer = Arc::new(MoeLayer::new(config, weights).unwrap());
        let cpu = CpuLayer::new(layer.clone(), Isa::detect());
        let (out, routes, _) = forward(&cpu, &b.input);
        let x = b.input.hidden.to_f32_vec("hidden").unwrap();
        let reference = moerunner::reference::forward(&layer, &x, &routes).unwrap();
        let err = rel_err("decoded path", &out, &reference, case.hidden);
        assert!(
            err <= tolerance(case.weight, case.act_format),
            "decoded path: rel err {err:.3e}"
        );
    }
}

/// The same call gives the same bits on 1, 2 and 3 threads, on both token paths.
#[test]
fn bitwise_deterministic_across_thread_counts() {
    for (w, a, tokens) in [
        (WeightFormat::Bf16, ActivationFormat::Bf16, 1),
        (WeightFormat::Mxfp4, ActivationFormat::Mxfp8, 7),
        (WeightFormat::Fp8Block, ActivationFormat::Fp8Block, 60),
        (WeightFormat::Nvfp4, ActivationFormat::Nvfp4PerToken, 60),
    ] {
        let case = Case {
            tokens,
            biases: true,
            ..Case::new(1000, w, a)
        };
        let b = build(&case);
        let cpu = CpuLayer::new(b.layer.clone(), Isa::detect());
        let runs: Vec<Vec<u32>> = [1, 2, 3]
            .iter()
            .map(|&n| {
                let pool = rayon::ThreadPoolBuilder::new()
                    .num_threads(n)
                    .build()
                    .unwrap();
                pool.install(|| {
                    forward(&cpu, &b.input)
                        .0
                        .iter()
                        .map(|v| v.to_bits())
                        .collect()
                })
            })
            .collect();
        for (n, run) in runs.iter().enumerate().skip(1) {
            if let Some(i) = run.iter().zip(&runs[0]).position(|(a, b)| a != b) {
                panic!(
                    "{w} T={tokens}: {} threads differ from 1 at [{}, {}]",
                    n + 1,
                    i / case.hidden,
                    i % case.hidden
                );
            }
        }
        // Run to run, too.
        assert_eq!(
            forward(&cpu, &b.input)
                .0
                .iter()
                .map(|v| v.to_bits())
                .collect::<Vec<_>>(),
            runs[0]
        );
    }
}

/// The portable scalar kernels compute the same layer as the AVX2 ones.
#[test]
fn scalar_kernels_match_avx2() {
    if !Isa::Avx2Fma.available() {
        eprintln!("skipped: this CPU has no AVX2+FMA");
        return;
    }
    for (i, (w, a)) in pairs().into_iter().enumerate() {
        for tokens in [3, 40] {
            let case = Case {
                tokens,
                hidden: 160,
                ..Case::new(1100 + i as u64, w, a)
            };
            let s = check_with(&case, Isa::Scalar);
            let v = check_with(&case, Isa::Avx2Fma);
            let reference: Vec<f64> = v.iter().map(|&x| x as f64).collect();
            let diff = rel_err("scalar vs avx2", &s, &reference, case.hidden);
            assert!(
                diff <= tolerance(w, a) / 4.0,
                "{w}×{a} T={tokens}: scalar and AVX2 differ by {diff:.3e}"
            );
        }
    }
}

#[test]
fn loads_through_the_runner_by_name() {
    let case = Case::new(1200, WeightFormat::Bf16, ActivationFormat::Bf16);
    let b = build(&case);
    let loaded = moerunner::Runner::new()
        .load(
            (*b.layer).clone(),
            &moerunner::BackendChoice::Named("cpu".into()),
        )
        .unwrap();
    assert_eq!(loaded.backend(), "cpu");
    let fwd = ForwardInput {
        hidden: &b.input.hidden,
        routing: RoutingInput::Logits(b.input.router_logits.as_ref().unwrap()),
    };
    assert_eq!(
        loaded.forward(&fwd).unwrap().output.shape,
        vec![case.tokens, case.hidden]
    );
}

/// A moderate shape: several 128-row scale blocks, several work items per expert, experts on both
/// sides of the one-tile/decoded-block switch, 16 experts of which some get no token.
#[test]
fn moderate_shapes() {
    for (i, (w, a)) in [
        (WeightFormat::Bf16, ActivationFormat::Bf16),
        (WeightFormat::Fp8Block, ActivationFormat::Fp8Block),
        (WeightFormat::Mxfp4, ActivationFormat::Bf16),
        (WeightFormat::Nvfp4, ActivationFormat::Nvfp4),
    ]
    .into_iter()
    .enumerate()
    {
        let case = Case {
            experts: 16,
            top_k: 4,
            hidden: 512,
            inter: 384,
            tokens: 40,
            biases: true,
            ..Case::new(1300 + i as u64, w, a)
        };
        check(&case);
    }
}

/// Long inputs run in several passes of tokens; every pass must land in its own rows.
#[test]
fn several_token_passes() {
    for (i, (w, a)) in [
        (WeightFormat::Mxfp8, ActivationFormat::Mxfp8),
        (WeightFormat::Bf16, ActivationFormat::Bf16),
    ]
    .into_iter()
    .enumerate()
    {
        let case = Case {
            tokens: 45,
            ep: Some((1, 2)),
            biases: true,
            ..Case::new(1400 + i as u64, w, a)
        };
        let b = build(&case);
        let cpu = CpuLayer::new(b.layer.clone(), Isa::detect()).with_max_chunk_tokens(7);
        let (out, routes, _) = forward(&cpu, &b.input);
        let x = b.input.hidden.to_f32_vec("hidden").unwrap();
        let reference = moerunner::reference::forward(&b.layer, &x, &routes).unwrap();
        let err = rel_err("passes of 7 tokens", &out, &reference, case.hidden);
        assert!(
            err <= tolerance(w, a),
            "{w}: rel err {err:.3e} in passes of 7 tokens"
        );
    }
}

/// An E4M3 NaN code in the weights gives NaN where the reference does (the spec's codec), not a
/// finite value from the in-register bit trick.
#[test]
fn e4m3_nan_weights_stay_nan() {
    let case = Case {
        tokens: 12,
        ..Case::new(1500, WeightFormat::Fp8Block, ActivationFormat::Fp8Block)
    };
    let b = build(&case);
    let (config, mut w) = (*b.layer).clone().into_parts();
    let mut data = w.w2.data.to_vec();
    data[5] = 0x7F; // expert 0, W2 row 0 (output column 0)
    w.w2.data = data.into();
    let layer = Arc::new(MoeLayer::new(config, w).unwrap());
    let cpu = CpuLayer::new(layer.clone(), Isa::detect());
    let (out, routes, _) = forward(&cpu, &b.input);
    let x = b.input.hidden.to_f32_vec("hidden").unwrap();
    let reference = moerunner::reference::forward(&layer, &x, &routes).unwrap();
    for (i, (&o, &r)) in out.iter().zip(&reference).enumerate() {
        assert_eq!(o.is_nan(), r.is_nan(), "output {i}: cpu {o}, reference {r}");
    }
    assert!(
        routes.ids.contains(&0),
        "the case must route a token to expert 0"
    );
    assert!(
        out.iter().any(|v| v.is_nan()),
        "a token of expert 0 must get NaN"
    );
}
