//! The overflow rule (docs/robustness.md), on every backend the runner has here:
//! - at load, a scale whose decoded weights overflow f32 is refused, naming the tensor, expert,
//!   row and block (a legal UE8M0 byte 254 times an E4M3 448 is 448 · 2^127);
//! - at run time, finite inputs whose products overflow f32 give an error naming the token, never
//!   NaN or inf as data; tokens that stay in range are unaffected, and every backend (the float64
//!   reference included) refuses the same token.
//!
//! Backends are chosen by `MOERUNNER_TEST_BACKENDS` (comma list, default `cpu,reference`), so the
//! same test runs on a GPU machine with `cuda,cpu,reference`.

use moerunner::synth::random_layer;
use moerunner::{
    Activation, ActivationFormat, BackendChoice, BlockScales, ForwardInput, HostTensor,
    LayerConfig, MoeError, MoeLayer, Parallelism, RoutingConfig, RoutingInput, RoutingMethod,
    Runner, W13Order, WeightFormat,
};

fn backends() -> Vec<String> {
    std::env::var("MOERUNNER_TEST_BACKENDS")
        .unwrap_or_else(|_| "cpu,reference".into())
        .split(',')
        .map(|s| s.trim().to_string())
        .collect()
}

fn config(wf: WeightFormat, af: ActivationFormat) -> LayerConfig {
    LayerConfig {
        num_experts: 2,
        hidden: 64,
        intermediate: 64,
        weight_format: wf,
        activation_format: af,
        activation: Activation::Swiglu,
        w13_order: W13Order::GateUp,
        routing: RoutingConfig::new(RoutingMethod::Renormalize, 1),
        local_experts: 0..2,
        parallelism: Parallelism::default(),
    }
}

/// The layer with expert 1's first W13 UE8M0 scale byte set to `byte`.
fn with_w13_scale(wf: WeightFormat, af: ActivationFormat, byte: u8) -> Result<MoeLayer, MoeError> {
    let (cfg, mut w) = random_layer(&config(wf, af), 3, false)
        .unwrap()
        .into_parts();
    let BlockScales::Ue8m0(s) = &mut w.w13.scales else {
        panic!("mx format")
    };
    let per_expert = s.len() / 2;
    s[per_expert] = byte;
    MoeLayer::new(cfg, w)
}

#[test]
fn ue8m0_254_whose_decoded_weights_overflow_is_refused_at_load() {
    for (wf, af) in [
        (WeightFormat::Mxfp8, ActivationFormat::Mxfp8),
        (WeightFormat::Mxfp4, ActivationFormat::Bf16),
    ] {
        let e = with_w13_scale(wf, af, 254).unwrap_err().to_string();
        assert!(
            e.contains("`w13_scale`") && e.contains("expert 1") && e.contains("overflows f32"),
            "{wf}: {e}"
        );
        // 2^119 keeps every decoded value finite (448 · 2^119 < 3.4e38): legal, loaded.
        with_w13_scale(wf, af, 246).unwrap();
    }
}

#[test]
fn nvfp4_global_scale_whose_decoded_weights_overflow_is_refused_at_load() {
    let cfg = config(WeightFormat::Nvfp4, ActivationFormat::Nvfp4PerToken);
    let (cfg, mut w) = random_layer(&cfg, 3, false).unwrap().into_parts();
    w.w2.global_scales[1] = 1e37;
    let e = MoeLayer::new(cfg, w).unwrap_err().to_string();
    assert!(
        e.contains("`w2_global_scale`") && e.contains("expert 1") && e.contains("overflows f32"),
        "{e}"
    );
}

fn run(layer: &MoeLayer, backend: &str, x: &[f32], ids: &[i32]) -> Result<Vec<f32>, MoeError> {
    let t = ids.len();
    let hidden = HostTensor::from_f32(vec![t, 64], x);
    let ids = HostTensor::from_i32(vec![t, 1], ids);
    let weights = HostTensor::from_f32(vec![t, 1], &vec![1.0; t]);
    let loaded = Runner::new().load(layer.clone(), &BackendChoice::Named(backend.into()))?;
    let out = loaded.forward(&ForwardInput {
        hidden: &hidden,
        routing: RoutingInput::TopK {
            ids: &ids,
            weights: &weights,
        },
    })?;
    Ok(out.output.to_f32_vec("output").unwrap())
}

#[test]
fn products_that_overflow_are_an_error_naming_the_token_on_every_backend() {
    let runner = Runner::new();
    for (wf, af) in [
        (WeightFormat::Bf16, ActivationFormat::Bf16),
        (WeightFormat::Mxfp4, ActivationFormat::Bf16),
        (WeightFormat::Fp8Block, ActivationFormat::Fp8Block),
    ] {
        // A legal, finite layer: expert 1 of the mx layer has scale 2^119.
        let layer = if wf == WeightFormat::Mxfp4 {
            with_w13_scale(wf, af, 246).unwrap()
        } else {
            random_layer(&config(wf, af), 3, false).unwrap()
        };
        for backend in backends() {
            if let Err(why) =
                runner.supports(&BackendChoice::Named(backend.clone()), layer.config())
            {
                // Printed, never silent: a backend missing here is visible in the test log.
                println!("{backend} skipped for {wf}: {why}");
                continue;
            }
            // Token 1's hidden states are finite but large: its products overflow f32.
            let mut x = vec![0.5f32; 3 * 64];
            x[64..128].iter_mut().for_each(|v| *v = 1e30);
            // Token 2 shares token 1's expert and stays finite in the bf16 and fp8 layers.
            let ids = if wf == WeightFormat::Mxfp4 {
                [0, 1, 0]
            } else {
                [0, 1, 1]
            };
            match run(&layer, &backend, &x, &ids) {
                Err(MoeError::Overflow { token: 1, .. }) => {}
                other => {
                    panic!("{backend} {wf}: expected an overflow error for token 1, got {other:?}")
                }
            }
            // Without the large token, every output is finite.
            x[64..128].iter_mut().for_each(|v| *v = 0.5);
            let ids = [0, 0, 0];
            let out = run(&layer, &backend, &x, &ids).unwrap();
            assert!(out.iter().all(|v| v.is_finite()), "{backend} {wf}");
        }
    }
}
