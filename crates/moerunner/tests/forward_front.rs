//! The checks every backend runs before a forward call (`moerunner::forward`): hidden states of
//! each dtype with a NaN or an infinity are refused naming the element, through both the
//! converting front (`resolve_input`, the CPU backend's) and the checking one (`validate_input`,
//! for backends that take the tensor as it is and route logits themselves).

use moerunner::forward::{self, ForwardInput};
use moerunner::presets::preset;
use moerunner::synth::{self, RoutingMode};
use moerunner::{DType, HostTensor, WeightFormat};

#[test]
fn non_finite_hidden_states_are_refused_by_element_in_every_dtype() {
    let p = preset("qwen3-30b-a3b").unwrap();
    let mut config = p.config(WeightFormat::Bf16, None);
    config.hidden = 64;
    config.intermediate = 32;
    let layer = synth::random_layer(&config, 5, false).unwrap();
    for mode in [RoutingMode::Logits, RoutingMode::TopK] {
        for dtype in [DType::F32, DType::F16, DType::BF16] {
            let input = synth::random_input(&config, 3, mode, dtype, 6).unwrap();
            let fwd = ForwardInput {
                hidden: &input.hidden,
                routing: input.routing_input(),
            };
            // Finite: both fronts agree on T; `validate_input` resolves given routes, leaves logits
            // alone.
            let (_, routes) = forward::resolve_input(&layer, &fwd).unwrap();
            let (tokens, checked) = forward::validate_input(&layer, &fwd).unwrap();
            assert_eq!((tokens, routes.tokens), (3, 3));
            assert_eq!(checked.is_some(), mode == RoutingMode::TopK, "{mode:?}");
            for (bad, shown) in [(f32::NAN, "NaN"), (f32::NEG_INFINITY, "-inf")] {
                let mut x = input.hidden.to_f32_vec("hidden").unwrap();
                x[config.hidden + 7] = bad;
                let hidden = HostTensor::encode_f32(dtype, input.hidden.shape.clone(), &x);
                let fwd = ForwardInput {
                    hidden: &hidden,
                    routing: input.routing_input(),
                };
                for err in [
                    forward::resolve_input(&layer, &fwd).err(),
                    forward::validate_input(&layer, &fwd).err(),
                ] {
                    let msg = err.map(|e| e.to_string()).unwrap_or_default();
                    assert!(
                        msg.contains("hidden_states")
                            && msg.contains("[1, 7]")
                            && msg.contains(shown),
                        "{dtype:?} {mode:?} {shown}: {msg}"
                    );
                }
            }
        }
    }
}
